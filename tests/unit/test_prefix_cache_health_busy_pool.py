"""prefix-cache's health says whether its Redis answers, not whether one of its pooled
connections is free: with every pooled connection held by a call Redis keeps waiting (a write
under ``CLIENT PAUSE WRITE``), a call more fails UNAVAILABLE for want of a connection (counted,
``cachemesh_prefix_cache_redis_pool_exhausted_total``), and the service stays SERVING, its
health PING answered over a connection of its own. Against a real redis-server requiring a
password, the whole service started in process (``serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from cachemesh import build_request
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.prefix_cache.app import serve
from services.tools.stack.ports import free_port
from tests.redis_server import client_of, redis_server, require_password
from tests.unit.test_prefix_cache_warm_gauge import TOKEN, _scrape, _wait_serving

AUTH = (("x-cachemesh-internal", TOKEN),)
PASSWORD = "Busy-Pool-S3cret"
SERVING = health_pb2.HealthCheckResponse.SERVING
EXHAUSTED = "cachemesh_prefix_cache_redis_pool_exhausted_total"


def _commit(request_id: str) -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant="t",
        request_id=request_id,
        phase=pc.COMMIT_PHASE_WARM,
        model="sim-large",
        request=build_request("Rule 3?", model="sim-large"),
    )


async def _pings(admin: Redis) -> int:
    """The PINGs Redis has answered (its own count: a PING that never reached it is not)."""
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


async def _status(health: Any) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(reply.status)


async def test_a_busy_pool_leaves_prefix_cache_serving_while_its_redis_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the health PING waited for a pooled connection like any call, gave up after
    2 s, and prefix-cache read NOT_SERVING (the router then replays its bills to nobody)
    although Redis answered a PING on a fresh connection at once."""
    with redis_server(tmp_path) as plain:
        await require_password(plain, PASSWORD)
        url = plain.replace("redis://", f"redis://:{PASSWORD}@")
        address, metrics = (f"127.0.0.1:{free_port()}" for _ in range(2))
        environ = {
            "CACHEMESH_INTERNAL_TOKEN": TOKEN,
            "PREFIX_CACHE_LISTEN": address,
            "PREFIX_CACHE_METRICS_LISTEN": metrics,
            "PREFIX_CACHE_REDIS_URL": url,
            "PREFIX_CACHE_REDIS_MAX_CONNECTIONS": "2",
            "CACHEMESH_GRACE_S": "0",
            "OTEL_SDK_DISABLED": "true",
        }
        stop = asyncio.Event()
        server = asyncio.create_task(serve(environ, stop))
        admin = client_of(url)
        calls: list[asyncio.Task[pc.CommitResponse]] = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await _wait_serving(channel, server)
                health: Any = health_pb2_grpc.HealthStub(channel)  # no stub types shipped
                stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
                await admin.client_pause(60_000, all=False)  # writes only
                before = await _pings(admin)
                # two calls hold both pooled connections (their writes wait); a third finds none
                calls = [
                    asyncio.ensure_future(stub.Commit(_commit(f"r{i}"), metadata=AUTH, timeout=60))
                    for i in range(3)
                ]
                done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                (first,) = done
                refused = first.exception()
                assert isinstance(refused, grpc.aio.AioRpcError), refused
                assert refused.code() == grpc.StatusCode.UNAVAILABLE
                assert "PREFIX_CACHE_REDIS_MAX_CONNECTIONS" in (refused.details() or "")
                # the health checks on: NOT_SERVING (the fault), or a PING of the service
                # reaches Redis while the pool is still full (each 2 s)
                for _ in range(600):
                    if await _status(health) != SERVING or await _pings(admin) > before:
                        break
                    await asyncio.sleep(0.05)
                assert await _status(health) == SERVING, "NOT_SERVING while Redis answers"
                assert not any(c.done() for c in calls if c is not first)  # still full
                fresh = client_of(url)
                assert await fresh.ping() is True  # and Redis answers a fresh connection
                await fresh.aclose()
                assert f"{EXHAUSTED} 1.0" in await _scrape(f"http://{metrics}/metrics")
                await admin.client_unpause()
                held = await asyncio.gather(*(c for c in calls if c is not first))
                assert all(r.usage.input_tokens > 0 for r in held)  # answered once unpaused
        finally:
            for call in calls:
                call.cancel()
            with contextlib.suppress(Exception):
                await admin.client_unpause()
            await admin.aclose()
            stop.set()
            await asyncio.wait_for(server, 30)
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    down = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert down == [], [r.getMessage() for r in down]
    assert caplog.records, "no log captured"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
