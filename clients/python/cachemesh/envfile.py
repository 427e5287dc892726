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
from collections.abc import Callable, Sequence
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvFileError(ValueError):
    """An env file cannot be read or holds a malformed line."""


def parse_env_text(text: str, source: str = "<env>") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not _KEY.match(key):
            raise EnvFileError(
                f"{source}:{number}: expected KEY=VALUE (the line is not shown: it may hold a "
                "secret)"
            )
        values[key] = _value(value.strip(), f"{source}:{number}")
    return values


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


def _literal(line: str) -> Callable[[re.Match[str]], str]:
    """A replacement that is ``line`` as written (no backslash or group escapes)."""
    return lambda _: line


def _reads_back(line: str) -> dict[str, str] | None:
    try:
        return parse_env_text(line)
    except EnvFileError:
        return None


def set_values(text: str, values: Sequence[tuple[str, str]]) -> str:
    """``text`` with each key's line replaced by ``KEY=value``; a missing key goes after the
    line of the key before it in ``values`` (or at the end). Every other line is kept."""
    previous = ""
    for key, value in values:
        if not _KEY.match(key):
            raise EnvFileError(f"not a variable name: {key!r}")
        line = f"{key}={value}"
        if _reads_back(line) != {key: value}:
            raise EnvFileError(
                f"{key}: the value would not read back as written (a space and #, quotes, "
                "surrounding spaces, a $, a backslash in quotes)"
            )
        pattern = re.compile(rf"^{key}=.*$", re.MULTILINE)
        after = re.compile(rf"^{previous}=.*$", re.MULTILINE).search(text) if previous else None
        if pattern.search(text):
            text = pattern.sub(_literal(line), text)
        elif after is not None:
            text = f"{text[: after.end()]}\n{line}{text[after.end() :]}"
        else:
            text = text.rstrip("\n") + f"\n{line}\n"
        previous = key
    return text
