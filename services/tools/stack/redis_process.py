"""The stack's own Redis, where prefix-cache keeps commit records and per-tenant totals.

The stack starts a ``redis-server`` when ``PREFIX_CACHE_REDIS_URL`` names a loopback address
(``.env``: ``redis://127.0.0.1:50056/0``); a URL elsewhere is someone else's Redis, and an empty
one keeps prefix-cache's state in its process (lost with it). The server writes an append-only
file under ``<run_dir>/data/redis`` and fsyncs every write before acknowledging it
(``appendfsync always``), so a committed bill survives even a SIGKILL of Redis itself.

It holds every tenant's recorded answers, warm prefixes, commit records and totals, so it
requires a password: the run dir's ``redis-password`` (``services.tools.keys``), which the
server reads from ``<run_dir>/redis.conf`` (0600; a command line is visible to every local user
in ``ps``) and the services get in their Redis URLs (``stack_redis_urls``). It listens on
loopback only, in protected mode, and keeps its files private (a 0700 data dir, 0600 files:
``REDIS_UMASK``, ``private_data_dir``).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from services.tools.keys import url_with_password, write_secret
from services.tools.stack.service_table import ServiceDef

REDIS_URL_VAR = "PREFIX_CACHE_REDIS_URL"
# the other settings that may name the same Redis (moved with it onto free ports)
STACK_REDIS_URL_VARS = (REDIS_URL_VAR, "ROUTER_ANSWERS_REDIS_URL", "ROUTER_LIMITS_REDIS_URL")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
REDIS_CONFIG_FILE = "redis.conf"  # in the run dir: ``requirepass``, read by redis-server
REDIS_UMASK = 0o077  # the server's files: 0600 in 0700 folders

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
    """Why the stack cannot start its Redis as configured (None: it can). The stack gives its
    own Redis the run dir's generated password and puts it into the URLs itself: a URL that
    gives one of its own for that Redis would not match it, so it is refused, naming the
    variable (never the password)."""
    address = stack_redis_address(settings)
    if address is None:
        return None
    for var in STACK_REDIS_URL_VARS:
        parts = urlsplit(settings.get(var) or "")
        if parts.scheme not in ("redis", "rediss") or parts.password is None:
            continue
        if f"{parts.hostname}:{parts.port or 6379}" == address:
            return (
                f"{var} gives a password for the stack's own Redis at {address}, whose password "
                "the stack sets itself (the run dir's redis-password, put into the services' "
                f"URLs): remove the password from {var}, or run your own Redis with "
                f"requirepass elsewhere and point {var} (and the other Redis URLs) at it"
            )
    return None


def stack_redis_urls(settings: Mapping[str, str], password: str) -> dict[str, str]:
    """The Redis URLs of ``settings`` that name the stack's own Redis, with its password."""
    address = stack_redis_address(settings)
    if address is None:
        return {}
    urls: dict[str, str] = {}
    for var in STACK_REDIS_URL_VARS:
        url = settings.get(var) or ""
        parts = urlsplit(url)
        if parts.scheme == "redis" and f"{parts.hostname}:{parts.port or 6379}" == address:
            urls[var] = url_with_password(url, password)
    return urls


def write_redis_config(run_dir: Path, password: str) -> Path:
    """``<run_dir>/redis.conf`` (0600) giving the server its password, out of its argv."""
    path = run_dir / REDIS_CONFIG_FILE
    write_secret(path, f"requirepass {password}\n")
    return path


def private_data_dir(data_dir: Path) -> None:
    """The data dir 0700 and what is in it 0700 (folders) or 0600 (files): an older stack's
    were 0755 and 0644, every tenant's records readable by any local user."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    for path in data_dir.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def redis_argv(address: str, data_dir: Path, config: Path) -> list[str]:
    """redis-server on ``address`` over ``data_dir``, its password from ``config``
    (``write_redis_config``); started with ``REDIS_UMASK``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError(
            f"redis-server is not installed, and {REDIS_URL_VAR} asks the stack for its own "
            "Redis: install it (apt-get install redis-server; make up does so), or set "
            f"{REDIS_URL_VAR}= (empty) to keep prefix-cache's totals in its process (not durable)"
        )
    host, _, port = address.rpartition(":")
    private_data_dir(data_dir)
    return [
        exe,
        str(config),
        "--port", port,
        "--bind", host,
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]  # fmt: skip


def probe_redis(address: str, timeout_s: float = 1.0, password: str | None = None) -> str:
    """SERVING when the server answers PING (and has loaded its data), else UNREACHABLE, or
    NOT_SERVING (loading; or it wants a password, and ``password`` is not it). With a
    password, AUTH goes first and must be accepted: the stack's own Redis always has one, so a
    server without one (its AUTH answered with an error, its PING still with PONG) is another
    Redis on the port, never taken for the stack's (redis-py's clients would use it: they
    ignore that error)."""
    host, _, port = address.rpartition(":")
    commands = [["PING"]] if password is None else [["AUTH", password], ["PING"]]
    request = b"".join(_resp(command) for command in commands)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.sendall(request)
            reply = b""
            while reply.count(b"\r\n") < len(commands):
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return "UNREACHABLE"
    lines = reply.split(b"\r\n")
    if len(lines) <= len(commands):
        return "UNREACHABLE"  # closed before answering
    if password is not None and not lines[0].startswith(b"+OK"):
        return "NOT_SERVING"  # the password refused, or a Redis without one: not the stack's
    return "SERVING" if lines[len(commands) - 1].startswith(b"+PONG") else "NOT_SERVING"


def _resp(command: list[str]) -> bytes:
    """``command`` as a RESP array (a password is never parsed as an inline command)."""
    parts = [f"*{len(command)}\r\n".encode()]
    for word in command:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
