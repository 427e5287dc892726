"""Each service's Redis clients hold at most their setting's connections: a burst of calls
waits for a free connection (within the caller's own timeout) instead of opening one more.
With bare ``Redis.from_url`` the pools grew to the burst's concurrency and never shrank (one
burst of 300 in flight: the router 32 -> 180 connections, prefix-cache 12 -> 100, still open
after 60 s idle), so a few bursts over several routers would reach Redis's maxclients. Each
test runs N+k concurrent operations against a fresh real redis-server and reads CLIENT LIST."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.models import load_model_table
from services.common.redis_pool import bounded_redis, pool_exhausted
from services.common.tokens import load_tokenizers
from services.prefix_cache.app import serve
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.limit_settings import LimitSettings
from services.router.limit_tickets import Ticket
from services.router.limit_wiring import build_answer_ledger, build_limiter
from services.tools.stack.ports import free_port
from tests.redis_server import client_of, redis_server
from tests.unit.gateway_support import patient_limit_settings
from tests.unit.test_prefix_cache_warm_gauge import TOKEN, _wait_serving

TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())
N, K = 4, 28  # the bound, and the calls beyond it in flight at once


@pytest.fixture
async def fresh_redis(tmp_path: Path) -> AsyncIterator[tuple[str, Redis]]:
    """A redis-server of this test's own (no other client's connections), and an observer."""
    with redis_server(tmp_path) as url:
        observer = client_of(url)
        try:
            yield url, observer
        finally:
            await observer.aclose()


async def _others(observer: Redis) -> int:
    """The connections open to the server, the observer's own left out."""
    return len(await observer.client_list()) - 1


async def test_the_limits_redis_holds_at_most_its_setting_connections(
    fresh_redis: tuple[str, Redis],
) -> None:
    url, observer = fresh_redis
    settings = patient_limit_settings(  # a slow test machine never degrades
        {
            "ROUTER_LIMIT_REQUESTS_PER_MIN": "1000000",
            "ROUTER_LIMITS_REDIS_URL": url,
            "ROUTER_REDIS_MAX_CONNECTIONS": str(N),
        }
    )
    degraded: list[tuple[str, str]] = []
    limiter = await build_limiter(
        settings, ManualClock(), TABLE, TOKENIZERS, counted=lambda d, r: degraded.append((d, r))
    )
    try:
        request = build_request("Where is my order?", model="sim-small")
        tickets = await asyncio.gather(*(limiter.admit(f"t{i}", request) for i in range(N + K)))
        assert all(isinstance(t, Ticket) for t in tickets)
        assert degraded == []  # each waited for a connection, none failed
        assert 1 <= await _others(observer) <= N
    finally:
        await asyncio.wait_for(limiter.close(), 10)


async def test_the_answer_ledger_holds_at_most_its_setting_connections(
    fresh_redis: tuple[str, Redis],
) -> None:
    url, observer = fresh_redis
    ledger = await build_answer_ledger(url, 60, N, 30, lambda operation: None)
    assert ledger is not None
    try:
        answer = pb.CompleteResponse(content=[pb.ContentBlock(text="Within thirty days.")])
        await asyncio.gather(*(ledger.record("t", f"r{i}", "a" * 64, answer) for i in range(N + K)))
        assert 1 <= await _others(observer) <= N
        assert await observer.dbsize() == N + K  # every record written
    finally:
        await ledger.close()


async def test_prefix_cache_holds_at_most_its_setting_connections(
    fresh_redis: tuple[str, Redis],
) -> None:
    url, observer = fresh_redis
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_LISTEN": (address := f"127.0.0.1:{free_port()}"),
        "PREFIX_CACHE_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "OTEL_SDK_DISABLED": "true",
        "CACHEMESH_GRACE_S": "0",
        "PREFIX_CACHE_REDIS_URL": url,
        "PREFIX_CACHE_REDIS_MAX_CONNECTIONS": str(N),
    }
    stop = asyncio.Event()
    server = asyncio.create_task(serve(environ, stop))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await _wait_serving(channel, server)
            stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
            commits = [
                stub.Commit(
                    pc.CommitRequest(
                        tenant="t",
                        request_id=f"r{i}",
                        phase=pc.COMMIT_PHASE_WARM,
                        model="sim-large",
                        request=build_request(f"Rule {i}?", model="sim-large"),
                    ),
                    metadata=(("x-cachemesh-internal", TOKEN),),
                    timeout=60,
                )
                for i in range(N + K)
            ]
            await asyncio.gather(*commits)  # each answered: none failed for want of one
        assert 1 <= await _others(observer) <= N + 1  # and its health PING's own connection
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)


@pytest.mark.parametrize(
    ("read", "name"),
    [
        (lambda env: LimitSettings.from_env(env), "ROUTER_REDIS_MAX_CONNECTIONS"),
        (lambda env: PrefixCacheSettings.from_env(env), "PREFIX_CACHE_REDIS_MAX_CONNECTIONS"),
    ],
)
def test_a_bound_of_0_is_refused_at_start_up_naming_the_variable(read: object, name: str) -> None:
    env = Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, name: "0"})
    with pytest.raises(ConfigError, match=f"{name} must be >= 1, got 0"):
        read(env)  # type: ignore[operator]


async def test_the_first_calls_after_redis_restarted_reconnect_their_pooled_connections(
    tmp_path: Path,
) -> None:
    """Redis restarted (its data kept or not) under a live client: each pooled connection it
    closed is reconnected before its next call. redis-py 8.1 skipped that check whenever
    maintenance notifications were on, as they are by default ("auto"), so every pooled
    connection failed its next call: 8 retries of recorded answers made 8 model calls, 8
    requests of a tenant over its budget were admitted. Each service's clients are these."""
    port = free_port()
    for run in ("before", "after"):
        (tmp_path / run).mkdir()
    with ExitStack() as before:
        url = before.enter_context(redis_server(tmp_path / "before", port=port))
        client = bounded_redis("ROUTER_LIMITS_REDIS_URL", url, N, 5)
        await asyncio.gather(*(client.ping() for _ in range(N)))  # N connections pooled
        # stopped while the event loop runs, as a service's does: it sees them closed
        await asyncio.to_thread(before.close)
    try:
        with redis_server(tmp_path / "after", port=port):
            answers = await asyncio.gather(*(client.ping() for _ in range(N)))
            assert answers == [True] * N
    finally:
        await client.aclose()


async def test_a_call_that_finds_every_connection_busy_is_told_apart_from_a_redis_failure(
    fresh_redis: tuple[str, Redis],
) -> None:
    """The pool's wait running out (its own bound) is ``pool_exhausted``; a Redis that refuses
    the connection (down) is not: only that one is a failure of Redis."""
    url, observer = fresh_redis
    client = bounded_redis("X_REDIS_URL", url, 1, 0.1)
    holding = asyncio.ensure_future(client.blpop(["never-pushed"], 0))  # holds the one
    try:
        for _ in range(1000):  # until the BLPOP holds the connection
            if (await observer.info("clients"))["blocked_clients"] == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(RedisError) as busy:
            await client.ping()
        assert pool_exhausted(busy.value)
    finally:
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
        await client.aclose()
    down = bounded_redis("X_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0", 1, 0.1)
    with pytest.raises(RedisError) as refused:
        await down.ping()
    assert not pool_exhausted(refused.value)
    await down.aclose()


@pytest.mark.parametrize("path", ["/2x", "/abc", "/%32x", "/²"])
def test_a_redis_database_that_is_not_a_number_is_refused(path: str) -> None:
    # redis-py read these as database 0 without a word (the limits, the ledger and
    # prefix-cache then shared database 0 with whatever else was there)
    url = f"redis://:s3cret@127.0.0.1:6379{path}"
    with pytest.raises(ConfigError) as caught:
        bounded_redis("ROUTER_LIMITS_REDIS_URL", url, 1, 1.0)
    message = str(caught.value)
    assert message.startswith("ROUTER_LIMITS_REDIS_URL: the database of a Redis URL")
    assert "s3cret" not in message and path not in message and "\n" not in message


@pytest.mark.parametrize("url", ["redis://h:6379", "redis://h/", "rediss://h:1/15", "unix:///r.s"])
def test_a_redis_url_without_or_with_a_numbered_database_is_taken(url: str) -> None:
    assert bounded_redis("PREFIX_CACHE_REDIS_URL", url, 1, 1.0) is not None


def test_the_pools_connections_parse_replies_with_hiredis() -> None:
    # hiredis (a dependency in pyproject.toml) took prefix-cache's miss from 4.07 to 3.80 ms;
    # redis-py falls back to its pure-Python parser, silently, when hiredis does not import
    redis = bounded_redis("TEST_REDIS_URL", "redis://127.0.0.1:1/0", 2, 1.0)
    connection = redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    assert type(connection._parser).__name__ == "_AsyncHiredisParser"
