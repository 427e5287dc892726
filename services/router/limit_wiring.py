"""Builds the Gateway's shared state from its settings: the ``Limiter`` (its counts in Redis
when ROUTER_LIMITS_REDIS_URL is set, else in this process; ``limiter_on``: over a given store)
and the answer ledger (when ROUTER_ANSWERS_REDIS_URL is set). Each Redis is checked at
start-up: an unreachable one stops the router rather than leaving it to count or remember
alone."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import Clock
from services.common.env import ConfigError, redacted_url
from services.common.models import ModelTable
from services.common.redis_pool import bounded_redis
from services.common.tokens import Tokenizers
from services.router.answer_ledger import LedgerOperation, RedisAnswerLedger
from services.router.breaker import Breaker, RedisClient, redis_breaker
from services.router.limit_settings import REDIS_URL, LimitSettings
from services.router.limits import Limiter, LimitStore, MemoryLimitStore, UniformPolicies
from services.router.prompt_counts import count_prompt
from services.router.redis_limits import RedisLimitStore

ANSWERS_REDIS_URL = "ROUTER_ANSWERS_REDIS_URL"


async def build_limiter(
    settings: LimitSettings,
    clock: Clock,
    table: ModelTable,
    tokenizers: Tokenizers,
    tracer: trace.Tracer | None = None,
    counted: Callable[[str, str], None] | None = None,
    lost: Callable[[int], None] | None = None,
    reset: Callable[[], None] | None = None,
    breaker_opened: Callable[[RedisClient], None] | None = None,
) -> Limiter:
    """``tokenizers``: the pipeline's (one load, one cache), to count what a request's prompt
    reserves of the token rate, with the requested row's tokenizer (``auto``'s: its large
    tier's, whose price is its baseline). ``reset``: told each time the limits' Redis is
    found to have lost its counts (``RedisLimitStore``). ``breaker_opened``: each time the
    limits' Redis is left alone after its admits failed in a row (ROUTER_REDIS_BREAKER_S)."""
    store: LimitStore = MemoryLimitStore()
    breaker = None
    if settings.redis_url is not None:
        url = settings.redis_url
        redis = bounded_redis(REDIS_URL, url, settings.redis_max_connections, settings.timeout_s)
        shared = RedisLimitStore(await _reachable(REDIS_URL, url, redis), url=url, reset=reset)
        try:
            await shared.start()
        except RedisError as exc:
            await redis.aclose()
            raise ConfigError(
                f"{REDIS_URL}: Redis at {redacted_url(url)} refused ({exc})"
            ) from None
        store = shared
        breaker = redis_breaker("limits", settings.redis_breaker_s, breaker_opened or _no_count)
    return limiter_on(store, settings, clock, table, tokenizers, tracer, counted, lost, breaker)


def limiter_on(
    store: LimitStore,
    settings: LimitSettings,
    clock: Clock,
    table: ModelTable,
    tokenizers: Tokenizers,
    tracer: trace.Tracer | None = None,
    counted: Callable[[str, str], None] | None = None,
    lost: Callable[[int], None] | None = None,
    breaker: Breaker | None = None,
) -> Limiter:
    """The ``Limiter`` of ``settings`` over ``store`` (``build_limiter``'s, and the offline
    estimator's, whose counts are in its own process); ``breaker``: over the store's Redis."""

    def count(request: pb.CompleteRequest) -> int:
        spec = table.baseline_for(request.model)
        return count_prompt(request, tokenizers.for_spec(spec))

    policies = UniformPolicies(settings.policy)
    return Limiter(
        store, policies, clock, count, tracer, settings.timeout_s, counted, lost, breaker=breaker
    )


async def build_answer_ledger(
    url: str | None,
    ttl_s: float,
    max_connections: int,
    timeout_s: float,
    failed: Callable[[LedgerOperation], None],
) -> RedisAnswerLedger | None:
    """The shared answer ledger when ROUTER_ANSWERS_REDIS_URL is set (checked at start-up),
    over at most ``max_connections`` connections, each call waiting up to ``timeout_s`` (the
    ledger's own timeout) for one; ``failed``: told of each failed renewal of a claim."""
    if url is None:
        return None
    redis = bounded_redis(ANSWERS_REDIS_URL, url, max_connections, timeout_s)
    return RedisAnswerLedger(await _reachable(ANSWERS_REDIS_URL, url, redis), ttl_s, failed=failed)


def ledger_breaker(
    settings: LimitSettings, opened: Callable[[RedisClient], None] | None = None
) -> Breaker:
    """The answer ledger's breaker over its Redis (ROUTER_REDIS_BREAKER_S, as the limits')."""
    return redis_breaker("answer_ledger", settings.redis_breaker_s, opened or _no_count)


def _no_count(client: RedisClient) -> None:
    pass


async def _reachable(var: str, url: str, redis: Redis) -> Redis:
    """``redis``, a client of the Redis at ``url`` (``var``'s value), once it answered a PING."""
    try:
        await redis.ping()
    except RedisError as exc:
        await redis.aclose()
        raise ConfigError(f"{var}: cannot reach Redis at {redacted_url(url)} ({exc})") from None
    return redis
