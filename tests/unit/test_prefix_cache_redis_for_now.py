"""A Redis that answers prefix-cache's start-up PING with a refusal for now (MASTERDOWN: a
replica whose master is gone, with ``replica-serve-stale-data no``; BUSY: a script past
``busy-reply-threshold``; LOADING; TRYAGAIN) is an outage to wait out, not a configuration
error: the service starts NOT_SERVING and turns SERVING once Redis answers. A real refusal of
the service (a wrong password, a database index Redis does not have) still stops it, naming
``PREFIX_CACHE_REDIS_URL``. Against real redis-servers (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from services.common.env import ConfigError
from services.prefix_cache.app import serve
from services.prefix_cache.redis_health import RedisHealth
from services.tools.stack.ports import free_port
from tests.redis_server import client_of, redis_server

TOKEN = "test-internal-token-0123456789"


def _environ(url: str) -> dict[str, str]:
    return {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_REDIS_URL": url,
        "OTEL_SDK_DISABLED": "true",
    }


async def _logged(
    caplog: pytest.LogCaptureFixture, words: str, serving: asyncio.Future[None]
) -> str:
    """The first WARNING holding ``words``, waited for while ``serving`` runs (its error
    raised if it ended: a start-up that stopped)."""
    async with asyncio.timeout(60):
        while True:
            found = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and words in r.getMessage()
            ]
            if found:
                return found[0]
            if serving.done():
                serving.result()
                raise AssertionError(f"prefix-cache stopped before logging {words!r}")
            await asyncio.sleep(0.05)


async def _serve_until(
    url: str, caplog: pytest.LogCaptureFixture, answer: Callable[[], Awaitable[object]]
) -> tuple[str, str]:
    """prefix-cache started on ``url``: its NOT_SERVING line, then (once ``answer`` made
    Redis answer again) its SERVING-again line."""
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(_environ(url), stop))
    try:
        down = await _logged(caplog, "NOT_SERVING", serving)
        await answer()
        up = await _logged(caplog, "answers again: SERVING", serving)
        return down, up
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)


async def test_a_replica_answering_masterdown_at_start_up_does_not_stop_prefix_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ConfigError ("PREFIX_CACHE_REDIS_URL: Redis at ... refused (MASTERDOWN ...)"),
    exit 2 at every restart for as long as the failover lasted."""
    with redis_server(tmp_path) as url:
        admin = client_of(url)
        try:
            await admin.config_set("replica-serve-stale-data", "no")
            await admin.replicaof("127.0.0.1", free_port())  # a master that is not there
            down, _ = await _serve_until(url, caplog, lambda: admin.replicaof("NO", "ONE"))
            assert "MasterDownError" in down and "PREFIX_CACHE_REDIS_URL" in down
        finally:
            await admin.aclose()


async def test_a_redis_busy_with_a_script_at_start_up_does_not_stop_prefix_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another client's script runs past ``busy-reply-threshold``: every other command is
    answered BUSY until it ends (SCRIPT KILL). Before: ConfigError, exit 2."""
    with redis_server(tmp_path) as url:
        admin = client_of(url)
        looping = client_of(url)
        await admin.config_set("busy-reply-threshold", "50")
        script = asyncio.ensure_future(looping.eval("while true do end", 0))
        try:
            for _ in range(200):  # the script past the threshold: 50 ms
                if await _busy(url):
                    break
                await asyncio.sleep(0.05)
            down, _ = await _serve_until(url, caplog, admin.script_kill)
            assert "BUSY" in down
        finally:  # bounded: the script runs until killed, and a failure above left it running
            await _end_script(script, admin)
            await looping.aclose()
            await admin.aclose()


async def _end_script(script: asyncio.Future[object], admin: Redis) -> None:
    """Kills the script if it still runs, then waits for its call to end (at most 10 s: an
    await with no bound hung the test when it failed before killing it)."""
    if not script.done():
        with contextlib.suppress(ResponseError):  # NOTBUSY: it had ended meanwhile
            await admin.script_kill()
    await asyncio.wait_for(asyncio.gather(script, return_exceptions=True), 10)


async def _busy(url: str) -> bool:
    client = client_of(url)
    try:
        await client.ping()
        return False
    except ResponseError as exc:
        return str(exc).startswith("BUSY")
    finally:
        await client.aclose()


async def test_a_database_redis_does_not_have_still_stops_the_start_up(tmp_path: Path) -> None:
    """``/16`` of a Redis with 16 databases: SELECT refused, whatever the time; a wrong
    password is the other such refusal (test_prefix_cache_redis_health.py)."""
    with redis_server(tmp_path) as url:
        wrong = url.rsplit("/", 1)[0] + "/16"
        with pytest.raises(ConfigError, match=r"PREFIX_CACHE_REDIS_URL: Redis at .* refused"):
            await asyncio.wait_for(serve(_environ(wrong), asyncio.Event()), timeout=30)


URL = "redis://127.0.0.1:6379/0"  # never reached: the client's PING is a fake's


class _Answers:
    """A Redis client whose PING raises ``error``: the refusals a real server is hard to
    bring to on cue (LOADING needs a large dataset, TRYAGAIN a cluster)."""

    def __init__(self, error: RedisError) -> None:
        self._error = error

    async def ping(self) -> None:
        raise self._error


def _answering(error: RedisError) -> Redis:
    return cast(Redis, _Answers(error))


@pytest.mark.parametrize(
    "error",
    [
        BusyLoadingError("Redis is loading the dataset in memory"),
        TryAgainError("Multiple keys request during rehashing of slot"),
        MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        ResponseError("BUSY Redis is busy running a script."),
    ],
    ids=["LOADING", "TRYAGAIN", "MASTERDOWN", "BUSY"],
)
async def test_a_refusal_for_now_at_start_up_is_not_serving(error: RedisError) -> None:
    told: list[bool] = []

    async def health(serving: bool) -> None:
        told.append(serving)

    await RedisHealth(_answering(error), URL, health, timeout_s=1.0).start()
    assert told == [False]


async def test_a_refusal_of_the_service_at_start_up_is_a_config_error() -> None:
    async def health(serving: bool) -> None:
        raise AssertionError("no health is set: the start-up stops")

    refused = ResponseError("NOPERM this user has no permissions to run the 'ping' command")
    watch = RedisHealth(_answering(refused), URL, health, timeout_s=1.0)
    with pytest.raises(ConfigError, match=r"PREFIX_CACHE_REDIS_URL: Redis at .* refused"):
        await watch.start()
