"""``.env`` files as cachemesh reads and writes them: the one parser of the project.

The format is the subset that both the local stack runner and docker compose read the same
way: ``KEY=VALUE`` lines, ``#`` comments on lines of their own and blank lines, an optional
pair of matching quotes around the whole value, and an optional ``export`` before the key
(``.run/demo-keys.env`` has it, so that ``source .run/demo-keys.env`` exports the keys).
Anything else is an error naming the file and line, never repeating the line (it may hold a
secret): among them a comment after a value (``A=1 # one``, ``B="x" # why``), which compose
drops and a plain reader keeps, a quote left open, a ``$`` anywhere in a value (compose
replaces ``$NAME`` and ``${NAME}``; python-dotenv, behind compose v1, inside single quotes too)
and a backslash inside quotes (compose reads ``\n``, ``\t``, ``\\``, ``\"`` there, ``\'`` in
single quotes). The rules for those differ between compose versions, so refusing them is the
one way the same file gives both stacks the same settings; a backslash in an unquoted value is
itself for every version, and read so.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvFileError(ValueError):
    """An env file cannot be read or holds a malformed line."""


def parse_env_text(text: str, source: str = "<env>") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        setting = _setting(raw)
        if setting is None:
            continue
        key, value = setting
        if value is None or not _KEY.match(key):
            raise EnvFileError(
                f"{source}:{number}: expected KEY=VALUE (the line is not shown: it may hold a "
                "secret)"
            )
        values[key] = _value(value, f"{source}:{number}")
    return values


def _setting(line: str) -> tuple[str, str | None] | None:
    """A line as the reader splits it: None for a blank line or a comment, else the name
    before its ``=`` (an ``export`` before it dropped) and the value after it (None: no ``=``),
    both stripped and neither checked."""
    words = line.strip()
    if not words or words.startswith("#"):
        return None
    key, sep, value = words.partition("=")
    return key.strip().removeprefix("export ").strip(), value.strip() if sep else None


def variable_set(line: str) -> str | None:
    """The variable a ``[export ]NAME=value`` line sets as the reader (and a shell's
    ``source``) sees it; None for a comment, a blank line or no ``=``. The value is not read:
    a line the reader would refuse (a ``$``) still names its variable."""
    setting = _setting(line)
    return setting[0] if setting is not None and setting[1] is not None else None


_COMMENT = re.compile(r"\s#")  # where docker compose starts a comment in an unquoted value


def _value(value: str, where: str) -> str:
    """The value of a line (``where`` = file:line), quotes removed; EnvFileError for one that
    docker compose reads otherwise."""
    if "$" in value:
        raise EnvFileError(
            f"{where}: a $ in a value: docker compose replaces $NAME and ${{NAME}} there (some "
            "versions inside single quotes too), the local stack would not: keep $ out of .env "
            "(a key: in the file its *_FILE variable names; make up also takes a setting from "
            "the environment)"
        )
    if value[:1] in ("'", '"') and "\\" in value:
        raise EnvFileError(
            f"{where}: a backslash in a quoted value: docker compose reads escapes there "
            "(\\n, \\t, \\\\, \\\", \\'), the local stack would not: leave the value unquoted, "
            "where a backslash is itself"
        )
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end == -1:
            raise EnvFileError(f"{where}: the value's opening {value[0]} is not closed on its line")
        if end != len(value) - 1:
            raise EnvFileError(
                f"{where}: text after the value's closing {value[0]} (docker compose drops a "
                "comment there): put the comment on a line of its own"
            )
        return value[1:end]
    if _COMMENT.search(value):
        raise EnvFileError(
            f"{where}: a space and # in an unquoted value start a comment for docker compose: "
            "put the comment on a line of its own, or quote the value if the # belongs to it"
        )
    return value


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvFileError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise EnvFileError(f"{path} is not UTF-8 (byte {exc.start}): save it as UTF-8") from None
    return parse_env_text(text, str(path))


def _reads_back(line: str) -> dict[str, str] | None:
    try:
        return parse_env_text(line)
    except EnvFileError:
        return None


def set_values(
    text: str,
    values: Sequence[tuple[str, str | None]],
    *,
    export: bool = False,
    append: bool = False,
) -> str:
    """``text`` with each key set by one line, ``KEY=value`` (``export``: ``export KEY=value``,
    the value quoted for a shell where it needs it, so that ``source`` reads it as the reader
    does), standing where the first line setting the key stood (``KEY=``, ``export KEY=``, as
    the reader reads a line's name; a key the user exports on any of its lines stays
    exported, so a shell that sources the file still exports it); a later line setting it
    again is dropped, and a key whose
    value is None is unset (each of its lines dropped). A missing key goes after the line of
    the key before it in ``values`` (``append``: at the end). Every other line is kept as
    written, and no value but the given ones is read (a line the reader refuses stays as it
    is). A value that would not read back as written is refused naming its key, never the
    value."""
    given: dict[str, str | None] = {}  # a key's value (None: unset)
    for key, value in values:
        if not _KEY.match(key):
            raise EnvFileError(f"not a variable name: {key!r}")
        given[key] = value
    lines_in = text.splitlines(keepends=True)
    # a key any of whose lines the user exports stays exported (a shell sourcing the file)
    exported = {
        name
        for raw in lines_in
        if raw.lstrip().startswith("export ") and (name := variable_set(raw)) in given
    }
    wanted = {
        key: None if value is None else _line(key, value, export or key in exported)
        for key, value in given.items()
    }
    # each kept line a group of its own; a key's line heads the group its missing successors join
    groups: list[list[str]] = []
    group_of: dict[str, list[str]] = {}
    for raw in lines_in:
        name = variable_set(raw)
        if name not in wanted:
            groups.append([raw])
            continue
        ours = wanted[name]
        if ours is not None and name not in group_of:
            ending = raw[len(raw.rstrip("\r\n")) :]  # as the line it replaces (none: the last)
            group_of[name] = [ours + ending]
            groups.append(group_of[name])
    previous: str | None = None
    for key, ours in wanted.items():
        if ours is not None and key not in group_of:
            after = None if append or previous is None else group_of.get(previous)
            if after is None:
                group_of[key] = [ours + "\n"]
                groups.append(group_of[key])
            else:
                after.append(ours + "\n")
                group_of[key] = after
        previous = key
    lines = [line for group in groups for line in group]
    # a line now followed by another (the file's last, without its newline) gets one
    return "".join(
        line if i == len(lines) - 1 or line.endswith("\n") else line + "\n"
        for i, line in enumerate(lines)
    )


def _line(key: str, value: str, export: bool) -> str:
    """``KEY=value`` (``export KEY=value``, the value quoted for a shell where it needs it),
    refused naming the key, never the value, unless the reader reads it back as written."""
    line = f"export {key}={shlex.quote(value)}" if export else f"{key}={value}"
    if _reads_back(line) != {key: value}:
        raise EnvFileError(
            f"{key}: the value would not read back as written "
            + (
                "as an export line, which a shell needs quoted (a quote or a backslash in it)"
                if export
                else "(a space and #, quotes, surrounding spaces, a $, a backslash in quotes)"
            )
        )
    return line
