"""No command line of the project takes an abbreviated option: argparse's default did, and
``python -m services.tools.bench.gateway --out x.json`` was taken as ``--out-dir x.json`` (a
directory named x.json). Each CLI's parser is built by its own ``main`` (stopped at its
``parse_args``, so nothing runs) and read with its subcommands' parsers; a module that parses a
command line and is not listed here fails the test, so a new CLI cannot slip past it."""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from cachemesh._argv import subcommand_parsers

ROOT = Path(__file__).resolve().parents[2]


def _main(path: str, *args: Any) -> Callable[[], object]:
    """``path``'s module's ``main`` called with ``args`` (its module name is its path's)."""
    module = path.removeprefix("clients/python/").removesuffix(".py").replace("/", ".")
    return lambda: importlib.import_module(module).main(*args)


# each CLI module's file, and how to reach its parser: its main with no flags (argv [] where
# main takes one, else sys.argv is set to the program's name alone)
MAIN_ARGS: dict[str, tuple[Any, ...]] = {
    "clients/python/cachemesh/cli.py": ([],),
    "clients/python/cachemesh/loadtest/cli.py": ([],),
    "services/tools/bench/fair_queue/__main__.py": ([],),
    "services/tools/bench/gateway/http_path.py": (),
    "services/tools/bench/gateway/run.py": ([],),
    "services/tools/bench/hit_cpu/__main__.py": (),
    "services/tools/bench/key_reload.py": (),
    "services/tools/bench/l1_stats.py": ([],),
    "services/tools/bench/prefix_cache/__main__.py": ([],),
    "services/tools/bench/router/__main__.py": ([],),
    "services/tools/bench/semantic_cache/__main__.py": ([],),
    "services/tools/bench/speculative/__main__.py": ([],),
    "services/tools/engine/cli.py": ([],),
    "services/tools/estimator/cli.py": ([],),
    "services/tools/evaluation/router/__main__.py": ([],),
    "services/tools/evaluation/semantic_cache/__main__.py": ([],),
    "services/tools/keys.py": ([],),
    "services/tools/stack/cli.py": ([],),
    "services/tools/verifier/train.py": ([],),
}
CLIS: dict[str, Callable[[], object]] = {path: _main(path, *a) for path, a in MAIN_ARGS.items()}
# the demo takes no flags: its parser is built by connection()
CLIS["clients/python/cachemesh/demo/__main__.py"] = lambda: importlib.import_module(
    "cachemesh.demo.__main__"
).connection("127.0.0.1:1")


# make train-verifier's module: it imports torch, which only .venv-train has, so its parser is
# read from the source (it is argparse's own: .venv-train has no cachemesh to import Parser from)
TRAIN = "services/tools/verifier/train.py"


def test_the_training_cli_parser_in_its_source() -> None:
    tree = ast.parse((ROOT / TRAIN).read_text(encoding="utf-8"))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "ArgumentParser"
    ]
    assert calls, "no ArgumentParser in " + TRAIN
    for call in calls:
        given = {k.arg: k.value for k in call.keywords}
        flag = given.get("allow_abbrev")
        assert isinstance(flag, ast.Constant) and flag.value is False, ast.unparse(call)


class _Built(BaseException):  # not an Exception: no `except Exception` of a main swallows it
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _parsed_files() -> set[str]:
    found = set()
    for top in (ROOT / "services", ROOT / "clients" / "python" / "cachemesh"):
        for path in top.rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "parse_args(" in text or "parse_known_args(" in text:
                found.add(str(path.relative_to(ROOT)))
    return found


def test_every_cli_module_is_listed() -> None:
    assert _parsed_files() == set(CLIS), "a module parses a command line: list it in CLIS"


# the training CLI imports torch, which this venv has not: read from its source instead
# (test_the_training_cli_parser_in_its_source)
@pytest.mark.parametrize("name", sorted(set(CLIS) - {TRAIN}))
def test_no_parser_takes_an_abbreviation(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def built(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", built)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", built)
    monkeypatch.setattr(sys, "argv", [name])
    with pytest.raises(_Built) as caught:
        CLIS[name]()
    parser = caught.value.parser
    every = [parser, *subcommand_parsers(parser)]
    assert [p.prog for p in every if p.allow_abbrev] == []


def test_the_gateway_bench_refuses_out_for_out_dir(capsys: pytest.CaptureFixture[str]) -> None:
    from services.tools.bench.gateway import run

    with pytest.raises(SystemExit) as stopped:
        run._parser().parse_args(["--out", "x.json"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --out x.json" in capsys.readouterr().err
