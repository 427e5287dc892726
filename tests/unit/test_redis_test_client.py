"""The unit tests' Redis client (``redis_client``, ``redis_server.client_of``) bounds each call:
redis-py waits for a reply without end by default, so a test Redis left stopped (SIGSTOP: a
pause injected into the test run) hung the next test's ``flushdb`` for ever (still waiting
after 5 s of 5 in the repro; CI's 90-minute limit the only end)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from tests.redis_server import CLIENT_TIMEOUT_S, _server_pid, client_of, redis_server


@pytest.mark.parametrize("backend", ["redis"])
async def test_the_fixtures_client_bounds_connects_and_replies(redis_client: Redis | None) -> None:
    assert redis_client is not None
    kwargs = redis_client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == CLIENT_TIMEOUT_S
    assert kwargs["socket_connect_timeout"] == CLIENT_TIMEOUT_S


async def test_a_stopped_server_fails_the_call_instead_of_hanging(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        pid = _server_pid(int(url.rsplit(":", 1)[1].split("/")[0]))
        assert pid is not None
        stopped = client_of(url, timeout_s=0.5)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(redis.TimeoutError):
                # the guard only turns a hang into a failure; the client's own bound answers
                await asyncio.wait_for(stopped.flushdb(), 60)
        finally:
            os.kill(pid, signal.SIGCONT)
            await stopped.aclose()


# a client built past ``client_of`` / ``sync_client_of``: redis-py's, with no bound on a reply
_BARE = re.compile(r"\bRedis\.from_url\(|\bRedis\((?!Error)|\bStrictRedis\(")


def test_every_test_client_of_redis_is_bounded() -> None:
    """About forty tests built their own client (``Redis.from_url``): a test Redis that
    stalled hung each until the 600 s faulthandler dump. Every one goes through
    ``redis_server.client_of`` (or ``sync_client_of``) now, and a new one must too."""
    tests = Path(__file__).resolve().parents[1]
    bare = [
        f"{path.relative_to(tests)}:{number}: {line.strip()}"
        for path in sorted(tests.rglob("*.py"))
        if path.name != "redis_server.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _BARE.search(line) and not line.lstrip().startswith("#")
    ]
    assert bare == []
