"""prefix-cache's health follows its Redis (PREFIX_CACHE_REDIS_URL): NOT_SERVING while a PING
finds it not answering, SERVING once one does; a call that finds Redis failing checks it at
once. Against a real redis-server (tests/redis_server.py), stopped and started again on its
port; the start-up of the whole service with its Redis down, or refusing its password."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.redis_pool import own_connection_redis
from services.common.tokens import load_tokenizers
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.app import serve
from services.prefix_cache.core import TokenizerSlot
from services.prefix_cache.redis_health import REDIS_URL, RedisHealth
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.wiring import build_core
from services.tools.stack.ports import free_port
from tests.black_hole import BlackHole
from tests.redis_server import client_of, redis_server, require_password

TOKEN = "test-internal-token-0123456789"
PASSWORD = "S3cretPassw0rd"


class Health:
    """What the service's ``HealthSwitch`` is told, in order."""

    def __init__(self) -> None:
        self.told: list[bool] = []
        self.changed = asyncio.Event()

    async def set(self, serving: bool) -> None:
        self.told.append(serving)
        self.changed.set()


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_health_follows_its_redis_as_it_stops_and_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: prefix-cache stayed SERVING for as long as its Redis was down (every call
    UNAVAILABLE). Now a PING that finds it not answering makes it NOT_SERVING (one WARNING,
    naming that Redis without its password), and the first that it answers SERVING again."""
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    health = Health()
    client = own_connection_redis(REDIS_URL, url, 2.0)  # the service's: re-made when broken
    watch = RedisHealth(client, url, health.set, timeout_s=2.0)
    for run in ("first", "again"):
        (tmp_path / run).mkdir()
        with redis_server(tmp_path / run, port=port) as server:
            await require_password(server, PASSWORD)
            await watch.check()
            assert health.told[-1] is True
        await watch.check()
        await watch.check()  # still down: said once
        assert health.told[-1] is False
    assert health.told == [True, False, True, False]
    down = [w for w in _lines(caplog, logging.WARNING) if "does not answer" in w]
    assert len(down) == 2 and f"redis://:***@127.0.0.1:{port}/0" in down[0], down
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    await client.aclose()


async def test_a_redis_that_hangs_is_not_serving_after_the_pings_timeout() -> None:
    """A Redis that takes the connection and never answers: the PING gives up after its
    timeout (the calls meanwhile wait for their callers' deadlines)."""
    hole = BlackHole()
    url = hole.endpoint.replace("http://", "redis://") + "/0"
    health = Health()
    client = client_of(url)
    try:
        await asyncio.wait_for(RedisHealth(client, url, health.set, timeout_s=0.2).check(), 10)
        assert health.told == [False]
    finally:
        await client.aclose()
        hole.close()


async def test_a_ping_given_up_closes_its_connection_and_the_next_opens_another(
    tmp_path: Path,
) -> None:
    """Redis holds the health's PING past its timeout (``CLIENT PAUSE``, 0.5 s): NOT_SERVING,
    and that connection (its PONG still to come) is not used again: a PING once Redis answers
    goes over a new one and reads SERVING. So too after Redis closed the connection."""
    health = Health()
    with redis_server(tmp_path) as url:
        admin = client_of(url)
        client = own_connection_redis(REDIS_URL, url, 0.1)
        watch = RedisHealth(client, url, health.set, timeout_s=0.1)
        try:
            await watch.check()
            first = await client.client_id()
            await admin.client_pause(500)
            await watch.check()
            assert health.told == [True, False]
            async with asyncio.timeout(10):
                while health.told[-1] is False:  # each PING given up until the pause ends
                    await watch.check()
            again = await client.client_id()
            assert again != first
            await admin.client_kill_filter(_id=str(again))
            await watch.check()
            assert health.told == [True, False, True]  # no failure seen: a new connection
            assert await client.client_id() != again
        finally:
            await admin.aclose()
            await client.aclose()


async def test_a_redis_that_answers_masterdown_is_not_serving(tmp_path: Path) -> None:
    """A replica whose master is gone (``replica-serve-stale-data no``) answers MASTERDOWN,
    even to a PING: it cannot serve a call, so NOT_SERVING, as for a Redis that is down."""
    health = Health()
    with redis_server(tmp_path) as url:
        admin = client_of(url)
        client = own_connection_redis(REDIS_URL, url, 2.0)
        watch = RedisHealth(client, url, health.set, timeout_s=2.0)
        try:
            await watch.check()
            await admin.config_set("replica-serve-stale-data", "no")
            await admin.replicaof("127.0.0.1", free_port())
            await watch.check()
            assert health.told == [True, False]
        finally:
            await admin.aclose()
            await client.aclose()


async def test_a_call_that_finds_redis_failing_checks_it_at_once(tmp_path: Path) -> None:
    """A call's Redis error wakes the check (no wait for the next PING, 2 s later): the Totals
    refused UNAVAILABLE, and the service NOT_SERVING as soon as the PING fails."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, "PREFIX_CACHE_REDIS_URL": url})
    settings = PrefixCacheSettings.from_env(env)
    table = load_model_table()
    slot = TokenizerSlot(load_tokenizers(table.models.values()))
    client = client_of(url)
    health = Health()
    watch = RedisHealth(client, url, health.set, timeout_s=2.0)
    api = PrefixCacheApi(build_core(settings, table, slot, ManualClock(), client), watch.failed)
    with redis_server(tmp_path, port=port):
        await watch.check()
        assert health.told == [True]
    watching = asyncio.ensure_future(watch.run(every_s=3600))  # no PING of its own meanwhile
    try:
        health.changed.clear()
        with pytest.raises(RequestError) as refused:
            await api.totals(pc.TotalsRequest(tenant="t"))
        assert refused.value.code == Code.UNAVAILABLE
        await asyncio.wait_for(health.changed.wait(), 10)
        assert health.told == [True, False]
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await client.aclose()


def _environ(url: str) -> dict[str, str]:
    return {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_REDIS_URL": url,
        "OTEL_SDK_DISABLED": "true",
    }


async def test_prefix_cache_starts_not_serving_while_its_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: a prefix-cache (re)started while its Redis was down refused to start (exit 2).
    Now it starts, NOT_SERVING, saying why (that Redis named without its password)."""
    url = f"redis://default:{PASSWORD}@127.0.0.1:{free_port()}/0"
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(_environ(url), stop))
    try:
        for _ in range(300):
            if any("NOT_SERVING" in w for w in _lines(caplog, logging.WARNING)):
                break
            assert not serving.done(), serving.result()
            await asyncio.sleep(0.1)
        # Redis's line (the start-up's own NOT_SERVING line may follow it)
        (line,) = [
            w for w in _lines(caplog, logging.WARNING) if "NOT_SERVING" in w and "Redis" in w
        ]
        assert "PREFIX_CACHE_REDIS_URL: Redis at redis://default:***@127.0.0.1:" in line
        assert PASSWORD not in line
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)


async def test_a_redis_that_refuses_prefix_caches_password_stops_it(tmp_path: Path) -> None:
    """Redis answers but refuses the credentials: a misconfiguration, not an outage to wait
    out, so prefix-cache stops naming the variable and that Redis (no password)."""
    with redis_server(tmp_path) as server:
        await require_password(server, PASSWORD)
        url = server.replace("redis://", "redis://:Not-The-Password@")
        with pytest.raises(ConfigError, match="PREFIX_CACHE_REDIS_URL") as caught:
            await asyncio.wait_for(serve(_environ(url), asyncio.Event()), timeout=30)
    assert "Not-The-Password" not in str(caught.value)
    assert "redis://:***@127.0.0.1:" in str(caught.value)
