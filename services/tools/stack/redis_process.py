"""The stack's own Redis, where prefix-cache keeps commit records and per-tenant totals.

The stack starts a ``redis-server`` when ``PREFIX_CACHE_REDIS_URL`` names a loopback address
(``.env``: ``redis://127.0.0.1:50056/0``); a URL elsewhere is someone else's Redis, and an empty
one keeps prefix-cache's state in its process (lost with it). The server writes an append-only
file under ``<run_dir>/data/redis`` and fsyncs every write before acknowledging it
(``appendfsync always``), so a committed bill survives even a SIGKILL of Redis itself.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from services.tools.stack.service_table import ServiceDef

REDIS_URL_VAR = "PREFIX_CACHE_REDIS_URL"
# the other settings that may name the same Redis (moved with it onto free ports)
STACK_REDIS_URL_VARS = (REDIS_URL_VAR, "ROUTER_ANSWERS_REDIS_URL", "ROUTER_LIMITS_REDIS_URL")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

# Not one of SERVICES (no Python module, no Dockerfile of ours): the supervisor runs it
# beside them; compose runs the official image (docker-compose.yml's ``redis``).
REDIS = ServiceDef(
    name="redis",
    module="redis-server",
    listen_var=REDIS_URL_VAR,
    default_port=50056,
    own_env_keys=(),
    protocol="redis",
)


def stack_redis_address(settings: Mapping[str, str]) -> str | None:
    """``host:port`` of the Redis the stack must start, or None (none, or not ours)."""
    url = settings.get(REDIS_URL_VAR) or ""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in _LOOPBACK:
        return None
    return f"{parts.hostname}:{parts.port or 6379}"


def stack_redis_refusal(settings: Mapping[str, str]) -> str | None:
    """Why the stack cannot start its Redis as configured (None: it can). The stack's own Redis
    takes no password (it listens on loopback only, in protected mode): a URL that gives one for
    it would be silently unprotected, any local process reading and writing every tenant's
    records and budgets, so it is refused, naming the variable (never the password)."""
    address = stack_redis_address(settings)
    if address is None:
        return None
    for var in STACK_REDIS_URL_VARS:
        parts = urlsplit(settings.get(var) or "")
        if parts.scheme not in ("redis", "rediss") or parts.password is None:
            continue
        if f"{parts.hostname}:{parts.port or 6379}" == address:
            return (
                f"{var} gives a password for the stack's own Redis at {address}, which the stack "
                "starts without one (loopback only, protected mode): remove the password from "
                f"the URL, or run your own Redis with requirepass and point {var} (and the other "
                "Redis URLs) at it"
            )
    return None


def redis_argv(address: str, data_dir: Path) -> list[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError(
            f"redis-server is not installed, and {REDIS_URL_VAR} asks the stack for its own "
            "Redis: install it (apt-get install redis-server; make up does so), or set "
            f"{REDIS_URL_VAR}= (empty) to keep prefix-cache's totals in its process (not durable)"
        )
    host, _, port = address.rpartition(":")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        exe,
        "--port", port,
        "--bind", host,
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]  # fmt: skip


def probe_redis(address: str, timeout_s: float = 1.0) -> str:
    """SERVING when the server answers PING (and has loaded its data), else UNREACHABLE."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return "UNREACHABLE"
    return "SERVING" if reply.startswith(b"+PONG") else "NOT_SERVING"
