"""The help a person reads at a terminal is plain text: ``cachemesh --help`` showed the module
docstring's reStructuredText literals (two pairs of double backticks), ``cachemesh-load --help``
and ``python -m services.tools.stack --help`` too."""

from __future__ import annotations

import argparse

import pytest

from cachemesh import cli
from cachemesh._argv import plain, subcommand_parsers
from cachemesh.loadtest import cli as load_cli
from services.tools.stack import cli as stack_cli


@pytest.mark.parametrize(
    ("name", "parser"),
    [
        ("cachemesh", cli._parser()),
        ("cachemesh-load", load_cli.parser()),
        ("stack", stack_cli._parser()),
    ],
)
def test_no_help_shows_double_backticks(name: str, parser: argparse.ArgumentParser) -> None:
    helps = {parser.prog: parser.format_help()}
    helps |= {sub.prog: sub.format_help() for sub in subcommand_parsers(parser)}
    marked = [prog for prog, text in helps.items() if "``" in text]
    assert marked == [], f"{name}: help with ``markup``: {marked}"
    # the words are still there, only the markup is gone
    assert parser.description is not None
    assert " ".join(plain(parser.description).split()) in " ".join(helps[parser.prog].split())


def test_plain_keeps_what_is_not_a_literal() -> None:
    assert plain('``cachemesh ask "..."``: one ``--x``') == 'cachemesh ask "...": one --x'
    assert plain("a ` b and `c`") == "a ` b and `c`"
    assert plain("an unpaired `` stays") == "an unpaired `` stays"
