"""Each process's environment: the layers merged, and the addresses in it.

``.env`` itself is read by ``cachemesh.envfile``, the project's one parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cachemesh.envfile import EnvFileError, read_env_file


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


def tool_settings(root: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """What a tool of the stack reads its own settings from (``make engine``'s cache dir, the
    llama tests'): ``root``'s ``.env``, ``environ`` over it, as ``Stack.settings()`` merges
    them for the services."""
    return merge_env(read_env_file(root / ".env"), environ, {}, {})


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
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        raise EnvFileError(f"expected host:port with a port in 1-65535, got {address!r}")
    return int(port)
