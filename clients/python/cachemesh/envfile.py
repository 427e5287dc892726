"""``.env`` files as cachemesh reads and writes them: the one parser of the project.

The format is the subset that both the local stack runner and docker compose read the same
way: ``KEY=VALUE`` lines, ``#`` comments and blank lines, an optional pair of matching quotes
around the value, and an optional ``export`` before the key (``.run/demo-keys.env`` has it, so
that ``source .run/demo-keys.env`` exports the keys). Anything else is an error naming the
file and line, never repeating the line (it may hold a secret).
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
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


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


def set_values(text: str, values: Sequence[tuple[str, str]]) -> str:
    """``text`` with each key's line replaced by ``KEY=value``; a missing key goes after the
    line of the key before it in ``values`` (or at the end). Every other line is kept."""
    previous = ""
    for key, value in values:
        if not _KEY.match(key):
            raise EnvFileError(f"not a variable name: {key!r}")
        line = f"{key}={value}"
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
