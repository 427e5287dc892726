"""A real redis-server for the tests: started on a free loopback port with a temporary dir,
no persistence, stopped at the end. ``make test-deps`` installs Debian's redis-server; a
missing binary fails the tests (the Redis store is never left untested)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.asyncio import Redis

from services.tools.stack.ports import free_port

# a test client's bound on each connect and each reply: far above any call of the tests (no
# blocking command through it), so a server left stopped (SIGSTOP) fails the call instead of
# hanging the test, and every later one, for ever (redis-py waits without end by default)
CLIENT_TIMEOUT_S = 30.0


def client_of(
    url: str,
    timeout_s: float = CLIENT_TIMEOUT_S,
    *,
    username: str | None = None,
    password: str | None = None,
) -> Redis:
    """An asyncio client of the test server at ``url``, each connect and reply bounded by
    ``timeout_s`` (a redis.TimeoutError past it). Every test's own client is one of these
    (``test_redis_test_client`` checks): a bare ``Redis.from_url`` hung its test until the
    600 s faulthandler dump when the server stalled."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        username=username,
        password=password,
    )


def sync_client_of(
    url: str, timeout_s: float = CLIENT_TIMEOUT_S, *, password: str | None = None
) -> redis.Redis:
    """``client_of``'s blocking twin, for a test that is not a coroutine."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, password=password
    )


def _server_pid(port: int) -> int | None:
    """The process id the Redis on ``port`` gives (``INFO server``), None while none answers."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None  # not listening yet, or loading
    finally:
        client.close()


@contextmanager
def redis_server(
    work_dir: Path,
    timeout_s: float = 20.0,
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Yields ``redis://127.0.0.1:<port>/0`` of a fresh server; stops it on exit. ``port``:
    a given one (a server restarted where its clients look for it), else a free one;
    ``extra_args``: more of redis-server's options (``--rename-command AUTH ""``)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "redis-server is not installed: run `make test-deps` (apt-get install redis-server)"
        )
    port = free_port() if port is None else port
    log = (work_dir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(work_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout_s
        # ours, by its process id: any PONG was taken for it, and a Redis already on the port
        # (another test's, a developer's) was handed to the test, which may flush it
        while (pid := _server_pid(port)) != proc.pid:
            if pid is not None:
                raise RuntimeError(
                    f"port {port} answers as another Redis (pid {pid}), not the redis-server "
                    f"started here (pid {proc.pid}): it is not used"
                )
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start on port {port}: "
                    f"{(work_dir / 'redis.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def require_password(url: str, password: str) -> None:
    """Makes the server at ``url`` (no password yet) require ``password``."""
    admin = client_of(url)
    try:
        await admin.config_set("requirepass", password)
    finally:
        await admin.aclose()
