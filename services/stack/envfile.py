"""Reading ``.env`` files and building each process's environment.

The format is the subset that both this runner and docker compose read the same way:
``KEY=VALUE`` lines, ``#`` comments and blank lines, an optional pair of matching quotes
around the value. Anything else is an error naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise EnvFileError(f"{source}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise EnvFileError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_env_text(text, str(path))


def merge_env(
    dotenv: Mapping[str, str],
    environ: Mapping[str, str],
    injected: Mapping[str, str],
    overrides: Mapping[str, str],
) -> dict[str, str]:
    """Later layers win: ``.env`` < the caller's environment < injected < explicit overrides.

    ``injected`` is what the stack itself provides (secrets of its run dir, the service's
    OTEL_SERVICE_NAME); ``overrides`` are the caller's explicit settings (tests, free ports).
    """
    merged = dict(dotenv)
    merged.update(environ)
    merged.update(injected)
    merged.update(overrides)
    return merged


def dial_address(listen: str) -> str:
    """Where a client reaches a server listening on ``listen`` from the same host."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def port_of(address: str) -> int:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise EnvFileError(f"expected host:port with a port in 1-65535, got {address!r}")
    return int(port)
