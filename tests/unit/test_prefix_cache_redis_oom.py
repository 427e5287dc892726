"""prefix-cache on a Redis out of memory (``maxmemory`` reached under ``noeviction``, the
policy its README requires): Redis still answers PING and reads, but refuses every write, so
every WARM and FINAL commit fails. The commits fail UNAVAILABLE saying Redis is out of memory
and what to do (the router keeps the bills in its outbox and replays them: not the caller's
fault), and the health reads NOT_SERVING until Redis takes a write again. Against a real
redis-server (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.background import cancel_within
from services.common.clock import ManualClock
from services.common.env import Env
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.redis_pool import own_connection_redis
from services.common.tokens import load_tokenizers
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.core import TokenizerSlot
from services.prefix_cache.redis_health import REDIS_URL, SEQ_KEY, STORE_KEY, RedisHealth
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.wiring import build_core
from tests.redis_server import client_of, redis_server

TOKEN = "test-internal-token-0123456789"
DEADLINE_S = 60.0  # the most a test here may take: each step is a few ms against a local Redis
ENDS_WITHIN_S = 5.0  # the most a cancelled health loop may take to end (its next step)
SYSTEM = " ".join(f"Rule {i}: answer from the refund policy." for i in range(120))


@dataclass
class Served:
    api: PrefixCacheApi
    watch: RedisHealth
    told: list[bool]
    changed: asyncio.Event  # set at each health told
    admin: Redis


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    with redis_server(tmp_path) as url:
        env = Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, REDIS_URL: url})
        settings = PrefixCacheSettings.from_env(env)
        table = load_model_table()
        slot = TokenizerSlot(load_tokenizers(table.models.values()))
        calls = client_of(url)
        own = own_connection_redis(REDIS_URL, url, 2.0)
        told: list[bool] = []
        changed = asyncio.Event()

        async def health(serving: bool) -> None:
            told.append(serving)
            changed.set()

        watch = RedisHealth(own, url, health, timeout_s=2.0)
        core = build_core(settings, table, slot, ManualClock(), calls)
        admin = client_of(url)
        await admin.config_set("maxmemory-policy", "noeviction")
        try:
            yield Served(PrefixCacheApi(core, watch.failed), watch, told, changed, admin)
        finally:
            for client in (calls, own, admin):
                await client.aclose()


def _warm(request_id: str) -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant="acme",
        request_id=request_id,
        phase=pc.COMMIT_PHASE_WARM,
        model="sim-small",
        request=pb.CompleteRequest(
            model="sim-small",
            system=[pb.ContentBlock(text=SYSTEM, cache_control=pb.CacheControl())],
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Refund?")])],
        ),
        replica="replica-1",
    )


def _final(request_id: str) -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant="acme", request_id=request_id, phase=pc.COMMIT_PHASE_FINAL, output_tokens=30
    )


async def _refused(call: Awaitable[object]) -> RequestError:
    with pytest.raises(RequestError) as refused:
        await call
    return refused.value


async def test_commits_on_a_redis_out_of_memory_say_so_and_health_is_not_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: SERVING throughout (PING answered), and each commit failed UNAVAILABLE with
    "prefix-cache's Redis is unreachable (OutOfMemoryError)": a Redis that answered."""
    async with asyncio.timeout(DEADLINE_S):  # a regression fails instead of hanging
        api, watch, admin = served.api, served.watch, served.admin
        await watch.start()
        served.changed.clear()
        await api.commit(_warm("before"))  # WARM made; its FINAL comes once Redis is full
        await admin.config_set("maxmemory", "1")  # under what it holds: every write refused
        watching = asyncio.ensure_future(watch.run(every_s=3600))  # no PING of its own meanwhile
        try:
            for commit in (_final("before"), _warm("during")):
                refused = await _refused(api.commit(commit))
                assert refused.code == Code.UNAVAILABLE  # the router keeps the bill, replays it
                assert "Redis is out of memory" in refused.message, refused.message
                assert "maxmemory" in refused.message and "unreachable" not in refused.message
            await asyncio.wait_for(served.changed.wait(), 10)  # the failed call checks at once
            assert served.told == [True, False]
            (line,) = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
            assert "NOT_SERVING" in line and "maxmemory" in line
            # reads still answer meanwhile
            totals = await api.totals(pc.TotalsRequest(tenant="acme"))
            assert totals.requests == 0
        finally:  # bounded: a cancel lost under a PING left it running (and this test hanging)
            assert not await cancel_within([watching], ENDS_WITHIN_S, "the test's health loop")
        await admin.config_set("maxmemory", "0")
        await watch.check()
        assert served.told == [True, False, True]
        await api.commit(_final("before"))  # the replay bills it
        assert (await api.totals(pc.TotalsRequest(tenant="acme"))).requests == 1


async def test_a_redis_out_of_memory_at_start_up_starts_not_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    await served.admin.set("held", "x")
    await served.admin.config_set("maxmemory", "1")
    with caplog.at_level(logging.WARNING):
        await served.watch.start()
    assert served.told == [False]
    assert any("out of memory" in r.getMessage() for r in caplog.records)


async def test_the_health_write_leaves_no_key(served: Served) -> None:
    """The write is ``SET ... XX`` on a key that never exists: refused when Redis is out of
    memory, a no-op otherwise (nothing added to the keyspace, nothing replicated). The one
    keys the checks keep are the store's id (``STORE_KEY``), written once, and its count
    (``SEQ_KEY``)."""
    for _ in range(3):
        await served.watch.check()
    assert served.told == [True]
    assert sorted(await served.admin.keys("*")) == [STORE_KEY.encode(), SEQ_KEY.encode()]
