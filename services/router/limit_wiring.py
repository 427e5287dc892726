"""Builds the Gateway's shared state from its settings: the ``Limiter`` (its counts in Redis
when ROUTER_LIMITS_REDIS_URL is set, else in this process; ``limiter_on``: over a given store)
and the answer ledger (when ROUTER_ANSWERS_REDIS_URL is set). Each Redis is called once at
start-up: one that refuses the router (a wrong password, no permission, a read-only replica)
stops it, as a misconfiguration; one that does not answer (down, restarting, hung) is a
WARNING, and the router starts without it, as it runs through an outage (its calls fail, and
its breaker leaves it alone, until it answers): a router restarted during a Redis outage must
not take the Gateway down with it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import Clock
from services.common.env import ConfigError, redacted_url
from services.common.models import ModelSpec, ModelTable
from services.common.redis_pool import bounded_redis, refused_for_now, say_eviction_policy
from services.common.tokens import Tokenizers
from services.router.answer_ledger import LedgerOperation, RedisAnswerLedger
from services.router.breaker import MEANWHILE, Breaker, RedisClient, redis_breaker
from services.router.key_settings import KeyStoreSettings
from services.router.limit_policy import Policies, UniformPolicies
from services.router.limit_settings import REDIS_URL, TENANT_LIMITS_FILE, LimitSettings
from services.router.limit_store import LimitStore
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.prompt_counts import count_prompt
from services.router.redis_limits import RedisLimitStore
from services.router.tenant_limits import LimitsFileError, PerTenantPolicies, TenantLimitStore

ANSWERS_REDIS_URL = "ROUTER_ANSWERS_REDIS_URL"

# what a Redis that evicts keys of its own accord drops without a word, and what that costs
EVICTED: dict[RedisClient, str] = {
    "limits": (
        "the tenants' counts, spends and holds on their budgets (each key has a TTL) can go "
        "without a word, and a tenant over its budget or rate is admitted again"
    ),
    "answer_ledger": (
        "the answer ledger's claims and records can go without a word, and a retry on another "
        "router calls the model and is billed again"
    ),
}

log = logging.getLogger("cachemesh.router")


def tenant_policies(
    settings: LimitSettings,
    keys: KeyStoreSettings,
    monotonic: Callable[[], float],
    wall: Callable[[], float],
) -> PerTenantPolicies:
    """Each tenant's limits: the settings', over which the per-tenant limits file (read now,
    polled as the key file is, CACHEMESH_API_KEYS_POLL_S) gives a tenant its own. A malformed
    file stops the router, naming the line and the variable."""
    path = settings.tenant_limits_path(keys.path)
    try:
        store = TenantLimitStore(path, monotonic, wall, keys.poll_s)
    except LimitsFileError as exc:
        raise ConfigError(f"{exc} ({TENANT_LIMITS_FILE})") from None
    return PerTenantPolicies(settings.policy, store)


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
    policies: Policies | None = None,
) -> Limiter:
    """``tokenizers``: the pipeline's (one load, one cache), to count what a request's prompt
    reserves of the token rate, with the requested row's tokenizer (``auto``'s: its large
    tier's, whose price is its baseline). ``reset``: told each time the limits' Redis is
    found to have lost its counts (``RedisLimitStore``). ``breaker_opened``: each time the
    limits' Redis is left alone after its admits failed in a row (ROUTER_REDIS_BREAKER_S).
    ``policies``: each tenant's limits (None: the settings' for every tenant)."""
    store: LimitStore = MemoryLimitStore()
    breaker = None
    if settings.redis_url is not None:
        url = settings.redis_url
        redis = bounded_redis(REDIS_URL, url, settings.redis_max_connections, settings.timeout_s)
        shared = RedisLimitStore(redis, url=url, reset=reset)
        # not answering: its first admit that reaches it reads the store's id instead
        await _first_call(REDIS_URL, url, redis, "limits", shared.start(), settings.timeout_s)
        store = shared
        breaker = redis_breaker("limits", settings.redis_breaker_s, breaker_opened or _no_count)
    return limiter_on(
        store, settings, clock, table, tokenizers, tracer, counted, lost, breaker, policies
    )


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
    policies: Policies | None = None,
) -> Limiter:
    """The ``Limiter`` of ``settings`` over ``store`` (``build_limiter``'s, and the offline
    estimator's, whose counts are in its own process); ``breaker``: over the store's Redis;
    ``policies``: each tenant's limits (None: ``settings.policy`` for every tenant)."""

    def count(request: pb.CompleteRequest) -> int:
        spec = table.baseline_for(request.model)
        return count_prompt(request, tokenizers.for_spec(spec))

    def largest_bill(request: pb.CompleteRequest, prompt_tokens: int) -> int:
        """What a request can be billed at most, held of its tenant's budgets while it runs
        (``limit_store.Hold``): ``most_billed`` of its row; ``auto``'s the largest of its tiers'
        (any may answer it: a fallback, a band). Not the large tier's alone: two tiers need not
        be ordered by price (a Claude small tier writes a 1h cache at 2,000 nanos a token, GPT-5
        large reads its input at 1,250), and a tier may think outside ``max_tokens``. Each
        tier's bill is of the prompt counted in its own vocabulary (``prompt_tokens`` is the
        baseline row's count), once a vocabulary: a Japanese prompt of 27,004 o200k tokens
        (GPT-5) is 39,003 of cl100k (a Claude tier), which was held at the 27,004."""
        counts = {table.baseline_for(request.model).tokenizer: prompt_tokens}

        def tokens(spec: ModelSpec) -> int:
            if spec.tokenizer not in counts:
                counts[spec.tokenizer] = count_prompt(request, tokenizers.for_spec(spec))
            return counts[spec.tokenizer]

        answering = table.answering(request.model)
        return max(most_billed(spec, request.max_tokens, tokens(spec)) for spec in answering)

    def most_output(request: pb.CompleteRequest) -> int:
        """What a request's output can reach (``ModelSpec.most_output_tokens``) on any row
        that may answer it: what the token rate reserves with its prompt."""
        return max(
            spec.most_output_tokens(request.max_tokens) for spec in table.answering(request.model)
        )

    if policies is None:
        policies = UniformPolicies(settings.policy)
    return Limiter(
        store,
        policies,
        clock,
        count,
        tracer,
        settings.timeout_s,
        counted,
        lost,
        breaker=breaker,
        cost_bound=largest_bill,
        output_bound=most_output,
    )


def most_billed(spec: ModelSpec, max_tokens: int, prompt_tokens: int) -> int:
    """The largest bill of a request of ``spec``'s row: its prompt at the dearest of the row's
    input and cache-write prices (long-context ones over their threshold), and its output at
    the output price: ``max_tokens`` of it, or the row's ``max_output_tokens`` when the row
    bills its thinking outside ``max_tokens`` (``thinks_outside_max_tokens``: R1's 405 output
    tokens at max_tokens 16)."""
    rates = spec.rates(prompt_tokens)
    dearest_input = max(rates.input_nanos, rates.cache_write_5m_nanos, rates.cache_write_1h_nanos)
    output = spec.most_output_tokens(max_tokens)
    return prompt_tokens * dearest_input + output * rates.output_nanos


async def build_answer_ledger(
    url: str | None,
    ttl_s: float,
    max_connections: int,
    timeout_s: float,
    failed: Callable[[LedgerOperation], None],
) -> RedisAnswerLedger | None:
    """The shared answer ledger when ROUTER_ANSWERS_REDIS_URL is set (called once at start-up,
    module doc), over at most ``max_connections`` connections, each call waiting up to
    ``timeout_s`` (the ledger's own timeout) for one; ``failed``: told of each failed renewal
    of a claim."""
    if url is None:
        return None
    redis = bounded_redis(ANSWERS_REDIS_URL, url, max_connections, timeout_s)
    await _first_call(ANSWERS_REDIS_URL, url, redis, "answer_ledger", redis.ping(), timeout_s)
    return RedisAnswerLedger(redis, ttl_s, failed=failed)


def ledger_breaker(
    settings: LimitSettings, opened: Callable[[RedisClient], None] | None = None
) -> Breaker:
    """The answer ledger's breaker over its Redis (ROUTER_REDIS_BREAKER_S, as the limits')."""
    return redis_breaker("answer_ledger", settings.redis_breaker_s, opened or _no_count)


def _no_count(client: RedisClient) -> None:
    pass


async def _first_call(
    var: str,
    url: str,
    redis: Redis,
    client: RedisClient,
    call: Awaitable[object],
    timeout_s: float,
) -> None:
    """``call``, the first of ``redis`` (a client of the Redis at ``url``, ``var``'s value),
    waited for up to ``timeout_s``. Refused (the credentials, a permission, a read-only
    replica, a database it does not have): ``ConfigError``. No answer, or an answer that it
    cannot serve for now (``refused_for_now``: out of memory under ``noeviction``, MASTERDOWN
    during a failover, BUSY with another client's script, TRYAGAIN; LOADING is a connection
    error): a WARNING, and the router starts without it. Before, BUSY was taken for a
    refusal: the router exited 2 at every restart for as long as the script ran."""
    where = redacted_url(url)  # never its password
    try:
        async with asyncio.timeout(timeout_s):
            await call
    except (AuthenticationError, AuthorizationError, ResponseError) as exc:
        if refused_for_now(exc):  # the one list prefix-cache's start-up reads too
            _starts_without(var, where, client, exc)
            return
        await redis.aclose()
        raise ConfigError(f"{var}: Redis at {where} refused ({exc})") from None
    except (RedisError, OSError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):  # asyncio's, with no message
            exc = TimeoutError(f"no answer within {timeout_s:g} s")
        _starts_without(var, where, client, exc)
        return
    await _eviction_checked(var, where, redis, client, timeout_s)


async def _eviction_checked(
    var: str, where: str, redis: Redis, client: RedisClient, timeout_s: float
) -> None:
    """An ERROR line when the Redis at ``where`` (``var``'s) evicts keys once full
    (``eviction_policy``): the router runs on it, but what it keeps there can go without a
    word. Before, under ``volatile-lru`` (ElastiCache's and Memorystore's default) a tenant that had
    spent its day's budget was admitted again once other keys filled that Redis (3 of 3), and
    nothing was logged: the store's own id, which detects a flushed Redis, has no TTL and
    stayed. A Redis that does not say (no ``maxmemory_policy`` in ``INFO``, as Redis Enterprise
    and Redis Cloud, which default to ``volatile-lru``; ``INFO`` renamed away; no answer) is a
    WARNING saying what can go and to make sure of ``noeviction``: before, an INFO line, and a
    Redis Enterprise database was read as ``noeviction`` and not named at all. Checked once a
    start, when the Redis answers the start-up's call (one down then is not checked: README)."""
    await say_eviction_policy(redis, var, where, EVICTED[client], timeout_s, log)


def _starts_without(var: str, where: str, client: RedisClient, exc: BaseException) -> None:
    _, meanwhile = MEANWHILE[client]
    log.warning(
        "%s: Redis at %s does not answer or cannot serve now (%s: %s); the router starts "
        "without it and calls it as requests come: %s until it answers",
        var,
        where,
        type(exc).__name__,
        exc,
        meanwhile,
    )
