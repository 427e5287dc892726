"""Command lines that never echo a secret (``cachemesh``, ``cachemesh-load``).

argparse repeats what it cannot place: ``cachemesh ask hi --api-key K`` printed
"unrecognized arguments: --api-key K", ``cachemesh --api-key K ask hi`` "invalid choice: 'K'",
and with abbreviations allowed ``--key K`` was taken for ``--key-file K`` and the key shown as
a file that cannot be read. ``Parser`` allows no abbreviation (its subcommands' parsers too);
``secret_flag`` finds a flag that looks like a secret's and is none of the parser's, so the
command refuses it by its name before argparse sees its value, and its usage errors show no
word that looks like a key or token (``scrubbed``); ``shown_path`` is a file setting's
value fit for a message: the value when it looks like a path, else a stand-in."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

# a flag's word that names a secret: --api-key, --key, --token, --admin-token, --password, ...
_SECRET_WORD = re.compile(
    r"^(?:api|(?:api)?(?:key|token|secret|password|passwd|pass|credentials?|auth|authorization"
    r"|bearer))$",
    re.IGNORECASE,
)
# a path's part that looks like a key or token: 20+ characters of letters and digits mixed
_RANDOM = re.compile(r"^(?=.*[a-z])(?=.*[A-Z])(?=.*\d)[A-Za-z0-9_\-+=.~]{20,}$")
# a word of an error message that may be a key: key-shaped (cm_..., sk-...) or random-looking
_WORD = re.compile(r"[^\s'\"=,:()\[\]]+")
_KEY_SHAPED = re.compile(r"^(?:cm|sk|key|api)[-_]\S{6,}$", re.IGNORECASE)
NOT_SHOWN = "[value not shown]"
# reStructuredText's inline literal, as the docstrings that become a command's description write
# it: ``cachemesh ask``
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def plain(text: str) -> str:
    """``text`` as a person reads it at a terminal: an inline literal's double backticks gone."""
    return _LITERAL.sub(r"\1", text)


class PlainHelpFormatter(argparse.HelpFormatter):
    """argparse's help with the description, the epilog and every option's and subcommand's
    help in plain text (``plain``): they are the modules' docstrings, written for the docs."""

    def _format_text(self, text: str) -> str:  # argparse's hook for description and epilog
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:  # and for each help= text
        return plain(super()._expand_help(action))


def scrubbed(message: str) -> str:
    """``message`` with every word that looks like a key or a token replaced by NOT_SHOWN."""

    def one(word: re.Match[str]) -> str:
        text = word.group(0)
        return NOT_SHOWN if _KEY_SHAPED.match(text) or _RANDOM.match(text) else text

    return _WORD.sub(one, message)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser without abbreviations: the subcommands' parsers (made as its own
    class) too, and ``--key`` or ``--admin-token`` is never taken for a ``-file`` option. Its
    help is plain text (``PlainHelpFormatter``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", PlainHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """argparse's usage error, any word of it that looks like a key or token not shown
        (``unrecognized arguments: ...``, ``invalid choice: '...'`` repeat the command line)."""
        super().error(scrubbed(message))


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every option string of ``parser`` and of its subcommands' parsers (argparse has no
    public listing: its actions are read)."""
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser under ``parser``, at every depth (``admin keys create``):
    each takes the options of the command above it too (``cachemesh``'s, ``admin``'s), as
    users put them after the subcommand as often as before it."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # argparse lists its subparsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias names one twice
                found += [sub, *subcommand_parsers(sub)]
    return found


def secret_flag(argv: Sequence[str], parser: argparse.ArgumentParser) -> str | None:
    """The first flag in ``argv`` (before ``--``) that none of ``parser``'s options is and
    whose name has a secret's word (``--api-key``, ``--token=...``): its name, never its value;
    None when there is none."""
    known = set(_options(parser))
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-") or arg == "-":
            continue
        name = arg.split("=", 1)[0]
        words = re.split(r"[-_]+", name.lstrip("-"))
        if name not in known and any(_SECRET_WORD.match(w) for w in [*words, "".join(words)]):
            return name
    return None


def shown_path(value: str | Path) -> str | None:
    """``value`` when it looks like a file's path (it holds a ``/`` and no part of it looks
    like a key or a token), else None: the message then names the setting, not its value (a
    key or token given in place of its file's path)."""
    text = str(value)
    if "/" not in text:
        return None
    if any(_RANDOM.match(part) for part in text.split("/")):
        return None
    return text


def file_named(value: str | Path, setting: str) -> str:
    """How a message names the file ``setting`` gives: ``/the/path (setting)``, or, when the
    value does not look like a path, ``named by setting``, the value not shown."""
    path = shown_path(value)
    if path is None:
        return f"named by {setting} (its value is not shown: it does not look like a path)"
    return f"{path} ({setting})"


EXIT_BROKEN_PIPE = 128 + 13  # a shell's status of a writer SIGPIPE ended (`yes | head -1`)


def piped(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """``main(argv)``, its output flushed; when the reader of stdout has gone
    (``cachemesh ask ... | head -1``, a pager quit early) the command stops quietly with 141,
    a shell's status for it, instead of a BrokenPipeError traceback (the answer was made and
    billed all the same: only its printing stopped). stdout is pointed at /dev/null so the
    interpreter's own flush at exit does not fail again."""
    try:
        try:
            return main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
