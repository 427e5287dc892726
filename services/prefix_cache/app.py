"""The prefix-cache process: builds every object from the environment, then serves."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from redis.asyncio import Redis

from cachemesh.v1 import prefix_cache_pb2, prefix_cache_pb2_grpc
from services.common.auth import InternalAuthInterceptor
from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import SystemClock
from services.common.env import Env
from services.common.grace import GraceEnd
from services.common.logs import configure_logging
from services.common.metrics import (
    LoopCounter,
    MetricsEndpoint,
    TokenizerCacheCollector,
    new_registry,
)
from services.common.model_overrides import model_table_from_env
from services.common.redis_pool import bounded_redis, own_connection_redis
from services.common.server import HealthSwitch, ServiceSpec, run_main, run_service
from services.common.telemetry import (
    SpanDrops,
    build_tracer_provider,
    server_interceptors,
    stop_tracing,
)
from services.common.tokens import load_tokenizers
from services.common.unread import warn_unread_settings
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.metrics import WARM_REFRESH_S, PrefixCacheMetrics
from services.prefix_cache.redis_health import REDIS_URL, RedisHealth
from services.prefix_cache.servicer import PrefixCacheServicer
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.wiring import build_core

# the longest a call waits for one of the pool's connections: its caller's deadline, the
# router's ROUTER_PREFIX_TIMEOUT_S (2 s by default); past it the call fails UNAVAILABLE
REDIS_CONNECTION_WAIT_S = 2.0
PREFIX_CACHE = prefix_cache_pb2.DESCRIPTOR.services_by_name["PrefixCache"].full_name


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    env = Env(environ)
    configure_logging(env)
    warn_unread_settings(environ, "prefix-cache")
    settings = PrefixCacheSettings.from_env(env)
    table = model_table_from_env(env)
    auth = InternalAuthInterceptor(settings.internal_token)
    provider = build_tracer_provider(environ, "prefix-cache")
    tokenizer = TokenizerSlot()
    health = HealthSwitch()
    redis: Redis | None = None
    watch: RedisHealth | None = None
    clients: list[Redis] = []
    registry = new_registry()
    registry.register(SpanDrops(provider))
    registry.register(TokenizerCacheCollector(tokenizer.loaded))
    metrics = PrefixCacheMetrics(registry, warm_gauge=settings.redis_url is None)  # no SCAN
    if settings.redis_url is not None:
        redis = _redis(settings.redis_url, settings.redis_max_connections)
        # its health is its Redis's: NOT_SERVING while Redis does not answer (a PING every 2 s
        # over a connection of its own: a pool whose connections are all busy is not an outage)
        own = own_connection_redis(REDIS_URL, settings.redis_url, REDIS_CONNECTION_WAIT_S)
        watch = RedisHealth(
            own,
            settings.redis_url,
            health.set,
            REDIS_CONNECTION_WAIT_S,
            reset=metrics.redis_store_reset,
        )
        clients = [redis, own]
    core = build_core(settings, table, tokenizer, SystemClock(), redis, metrics)
    sent = settings.server.send_limit  # a Plan's answer without its KV block hashes over it
    api = (
        PrefixCacheApi(core, max_send_bytes=sent)
        if watch is None
        else PrefixCacheApi(core, watch.failed, sent, pool_busy=metrics.redis_pool_exhausted)
    )
    servicer = PrefixCacheServicer(api)
    background: list[asyncio.Task[None]] = []

    async def warmup() -> None:
        if watch is not None:  # a refusal stops the start-up; no answer: NOT_SERVING meanwhile
            await watch.start()
            background.append(asyncio.create_task(watch.run(), name="redis-health"))
        # every vocabulary a row of the table names, each once (o200k_base: ~0.3 s, ~75 MB)
        loaded = await asyncio.to_thread(
            load_tokenizers, table.models.values(), settings.tokenizer_cache_tokens
        )
        tokenizer.set(loaded)
        if metrics.warm_prefixes is not None:
            gauge = _count_warm(core, metrics.warm_prefixes)
            background.append(asyncio.create_task(gauge, name="warm-prefix-gauge"))

    async def close() -> None:
        # bounded: a task that took its cancel and kept running held the stop forever
        await cancel_within(background, TASKS_END_S, "prefix-cache stop")
        for client in clients:
            await client.aclose()

    async def shutdown_tracing() -> None:
        await stop_tracing(provider)  # last: bounded, whatever the collector does

    grace = GraceEnd()
    await run_service(
        ServiceSpec(
            name="prefix-cache",
            settings=settings.server,
            service_names=[PREFIX_CACHE],
            register=lambda server: prefix_cache_pb2_grpc.add_PrefixCacheServicer_to_server(
                servicer, server
            ),
            interceptors=[*server_interceptors(provider, grace), auth],
            grace_end=grace,  # a call cut when the grace ends: UNAVAILABLE on its span
            warmup=warmup,
            on_stop=[close, shutdown_tracing],
            health=health,
            metrics=MetricsEndpoint(settings.metrics, registry),
        ),
        stop,
    )


async def _count_warm(core: PrefixCacheCore, gauge: LoopCounter) -> None:
    """Keeps the warm-prefix gauge current: in memory only, where a count is O(1) (with Redis
    it would be a SCAN of the keyspace, so the gauge is not exported at all)."""
    while True:
        gauge.set(await core.warm_prefixes())
        await asyncio.sleep(WARM_REFRESH_S)


def main() -> None:
    run_main("prefix-cache", serve)


def _redis(url: str, max_connections: int) -> Redis:
    """The shared store's client, over at most PREFIX_CACHE_REDIS_MAX_CONNECTIONS connections;
    a call finding them all busy waits for one as long as its caller waits for the answer (the
    router's ROUTER_PREFIX_TIMEOUT_S, 2 s by default)."""
    return bounded_redis(REDIS_URL, url, max_connections, REDIS_CONNECTION_WAIT_S)
