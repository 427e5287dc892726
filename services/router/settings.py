"""The router's configuration, read from the environment once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from services.common.auth import internal_token_from_env
from services.common.connections import ConnectionPolicy
from services.common.env import MAX_TOKENS_PER_S, ConfigError, Env
from services.common.kv_blocks import BLOCK_SIZE
from services.common.metrics import MetricsSettings
from services.common.models import LARGEST, SMALLEST, ModelTable, Tier
from services.common.server import (
    DEFAULT_REQUEST_BYTES,
    REQUEST_READ_SHARE,
    REQUEST_SHARE,
    ServerSettings,
    default_request_bytes,
)
from services.common.tls import ServerTls
from services.common.tokens import CACHED_TOKENS, cache_tokens_from_env
from services.router.admin_auth import AdminCredential, admin_credential_from_env
from services.router.balance import MAX_LOAD_RATIO, BalancePolicy
from services.router.idempotency import DEFAULT_MAX_BYTES
from services.router.key_settings import KeyStoreSettings
from services.router.limit_settings import LimitSettings
from services.router.replica_choice import MAX_WORK_WEIGHT, POLICIES, ChoiceSettings, TtftPolicy
from services.router.replica_health import EjectionPolicy

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9101"
# the read-ahead buffers' budget: past this a typo (a byte count meant as KiB) more than memory
READ_AHEAD_MAX_BYTES = 4 * 1024 * 1024 * 1024
# each model replica's KV cache, for the ttft policy's eviction model (``kv_capacity_from_env``)
KV_CAPACITY_VAR = "ROUTER_KV_CAPACITY_TOKENS"


@dataclass(frozen=True)
class RouterSettings:
    # ``server.max_message_bytes``, what gRPC reads of a call, is REQUEST_READ_SHARE times
    # ``max_request_bytes``: a request between the two is refused by the router itself
    server: ServerSettings
    metrics: MetricsSettings
    semantic_cache_addr: str
    prefix_cache_addr: str
    replicas: dict[str, tuple[str, ...]]  # model id -> replica addresses
    keys: KeyStoreSettings  # the shared API key file
    internal_token: str
    semantic_timeout_s: float
    semantic_lease_wait_s: float  # the longest a lookup waits for an identical in-flight call
    prefix_timeout_s: float
    model_timeout_s: float
    idempotency_ttl_s: float
    idempotency_max: int
    idempotency_max_bytes: int  # the kept answers' serialized bytes
    choice: ChoiceSettings  # which replica serves a model call (L3)
    limits: LimitSettings
    # ROUTER_MAX_REQUEST_BYTES: a larger Gateway request (serialized) is refused, naming it
    max_request_bytes: int = DEFAULT_REQUEST_BYTES
    routing_threshold: float | None = None  # None = the router card's calibrated default
    local_embedder: bool = True  # embed in the router when the semantic cache is unreachable
    cost_aware: bool = False  # weigh the tiers' Plan costs when a prefix may be warm
    # thresholds of the tiers between small and large; unset ones derive from the largest's
    tier_thresholds: dict[Tier, float] = field(default_factory=dict)
    # cost-aware: later turns a cache write is shared with (0 = priced in full now)
    write_amortize_turns: int = 0
    data_dir: Path | None = None  # the billing outbox's journal; None = in memory only
    outbox_retry_s: float = 1.0  # seconds between replays of the billing outbox
    # seconds a journal line no bill waits for (an open call's) may stay unfsynced
    journal_sync_s: float = 1.0
    # the billing outbox in memory (no data_dir): past this, model calls are refused
    outbox_max_bytes: int = 256 * 1024 * 1024
    # the model streams read ahead of their callers, all calls together (``read_ahead``)
    read_ahead_max_bytes: int = 64 * 1024 * 1024
    # a Store's deadline: off the answer's path, and it waits for L1's write-ahead log fsync
    semantic_store_timeout_s: float = 10.0
    # where billed answers are recorded for retries that reach another router; None = none
    answers_redis_url: str | None = None
    admin: AdminCredential | None = None  # None: the Admin API refuses every call
    admin_timeout_s: float = 10.0  # an Admin call's deadline on semantic-cache and prefix-cache
    # no prefix-cache call for this long after calls timed out in a row (0 = never skipped)
    prefix_breaker_s: float = 5.0
    # no Lookup (nor Store without a lease) for this long after Lookups timed out in a row
    # (0 = never skipped)
    semantic_breaker_s: float = 5.0
    # the least silence mid-answer that cuts a simulated or self-hosted call (0 = never cut)
    mid_answer_stall_s: float = 10.0
    # each vocabulary's encoding cache, in tokens' worth (CACHEMESH_TOKENIZER_CACHE_TOKENS)
    tokenizer_cache_tokens: int = CACHED_TOKENS

    @classmethod
    def from_env(cls, env: Env, table: ModelTable) -> RouterSettings:
        server = ServerSettings.from_env(env, "ROUTER", DEFAULT_LISTEN)
        max_request = max_request_bytes(env, server.max_message_bytes)
        return cls(
            # ROUTER_MAX_REQUEST_BYTES bounds what callers send: the servicer refuses a larger
            # request itself, naming the setting (counted, logged, traced), so gRPC reads
            # messages up to twice it (at most CACHEMESH_MAX_MESSAGE_BYTES) and refuses only
            # larger ones, with its own words, before any code of the router runs. Answers go
            # out under CACHEMESH_MAX_MESSAGE_BYTES like every service's (an L1 answer over
            # the request bound was refused RESOURCE_EXHAUSTED on every hit)
            server=replace(
                server,
                max_message_bytes=min(max_request * REQUEST_READ_SHARE, server.max_message_bytes),
                max_send_bytes=server.max_message_bytes,
                tls=ServerTls.read(env, "ROUTER"),
                connections=ConnectionPolicy.from_env(env, "ROUTER"),
            ),
            tokenizer_cache_tokens=cache_tokens_from_env(env),
            metrics=MetricsSettings.from_env(env, "ROUTER", DEFAULT_METRICS_LISTEN),
            semantic_cache_addr=env.address("SEMANTIC_CACHE_ADDR", "127.0.0.1:50052"),
            prefix_cache_addr=env.address("PREFIX_CACHE_ADDR", "127.0.0.1:50053"),
            replicas=parse_replicas(env.str("MODEL_REPLICAS"), table),
            keys=KeyStoreSettings.from_env(env),
            # read in the order of the fields (a bad MODEL_REPLICAS is named before a missing
            # token, as before); the admin credential below is checked against it
            internal_token=(internal_token := internal_token_from_env(env)),
            semantic_timeout_s=env.seconds("ROUTER_SEMANTIC_TIMEOUT_S", 2.0, minimum=0.001),
            semantic_lease_wait_s=env.seconds("ROUTER_SEMANTIC_LEASE_WAIT_S", 30.0, minimum=0.0),
            semantic_breaker_s=env.seconds("ROUTER_SEMANTIC_BREAKER_S", 5.0, minimum=0.0),
            prefix_timeout_s=env.seconds("ROUTER_PREFIX_TIMEOUT_S", 2.0, minimum=0.001),
            prefix_breaker_s=env.seconds("ROUTER_PREFIX_BREAKER_S", 5.0, minimum=0.0),
            model_timeout_s=env.seconds("ROUTER_MODEL_TIMEOUT_S", 300.0, minimum=0.001),
            idempotency_ttl_s=idempotency_ttl_s(env),
            idempotency_max=env.count("ROUTER_IDEMPOTENCY_MAX", 100_000, minimum=1),
            idempotency_max_bytes=idempotency_max_bytes(env),
            choice=choice_from_env(env),
            limits=LimitSettings.from_env(env),
            max_request_bytes=max_request,
            routing_threshold=(
                env.float("ROUTER_THRESHOLD", 0.0, minimum=-1.0, maximum=1.0)
                if env.optional_str("ROUTER_THRESHOLD") is not None
                else None
            ),
            local_embedder=env.bool("ROUTER_LOCAL_EMBEDDER", True),
            cost_aware=env.bool("ROUTER_COST_AWARE", False),
            tier_thresholds=parse_tier_thresholds(env, table),
            write_amortize_turns=env.count("ROUTER_WRITE_AMORTIZE_TURNS", 0),
            data_dir=Path(data_dir) if (data_dir := env.optional_str("ROUTER_DATA_DIR")) else None,
            outbox_retry_s=env.seconds("ROUTER_OUTBOX_RETRY_S", 1.0, minimum=0.01),
            journal_sync_s=env.seconds("ROUTER_JOURNAL_SYNC_S", 1.0, minimum=0.0),
            outbox_max_bytes=env.bytes("ROUTER_OUTBOX_MAX_BYTES", 256 * 1024 * 1024),
            read_ahead_max_bytes=env.bytes(
                "ROUTER_READ_AHEAD_MAX_BYTES", 64 * 1024 * 1024, maximum=READ_AHEAD_MAX_BYTES
            ),
            semantic_store_timeout_s=env.seconds(
                "ROUTER_SEMANTIC_STORE_TIMEOUT_S", 10.0, minimum=0.001
            ),
            answers_redis_url=env.redis_url("ROUTER_ANSWERS_REDIS_URL"),
            admin=admin_credential_from_env(env, internal_token),
            admin_timeout_s=env.seconds("ROUTER_ADMIN_TIMEOUT_S", 10.0, minimum=0.001),
            mid_answer_stall_s=env.seconds("ROUTER_MID_ANSWER_STALL_S", 10.0, minimum=0.0),
        )


def idempotency_ttl_s(env: Env) -> float:
    """ROUTER_IDEMPOTENCY_TTL_S, at least a second: 0 was taken and silently turned
    answer-once off (a retry with the same request_id was a second model call and a second
    bill). No test nor document relied on 0 meaning "off", and a client retrying cannot
    know the router forgot, so there is no off."""
    name = "ROUTER_IDEMPOTENCY_TTL_S"
    value = env.seconds(name, 86400.0, minimum=None)
    if value < 1:
        raise ConfigError(
            f"{name} must be >= 1 second, got {value:g}: a retry with the same request_id "
            "within it gets the first answer instead of a second model call and a second bill"
        )
    return value


MIN_REQUEST_BYTES = 1024


def max_request_bytes(env: Env, max_message_bytes: int) -> int:
    """ROUTER_MAX_REQUEST_BYTES, at most half of CACHEMESH_MAX_MESSAGE_BYTES
    (``max_message_bytes``; unset: 2 MiB, or that half when it is lower). At the message limit
    itself (the default when it was lowered) the router took a request whose model call (the
    request and its KV block hashes) was over it: every request over ~73% of the limit
    failed RESOURCE_EXHAUSTED with gRPC's own text from inside the stack."""
    name = "ROUTER_MAX_REQUEST_BYTES"
    most = max_message_bytes // REQUEST_SHARE
    why = (
        "the router passes each request on to semantic-cache, prefix-cache and the model in "
        "messages under that limit, each with fields of its own, and prefix-cache's Plan "
        "answers with the prompt's KV block hashes, 2 bytes a token (twice a request of text "
        "of a token a byte, as digits or CJK nearly are)"
    )
    if most < MIN_REQUEST_BYTES:
        raise ConfigError(
            f"CACHEMESH_MAX_MESSAGE_BYTES ({max_message_bytes}) leaves the router requests of "
            f"at most {most} bytes ({name} is at most half of it: {why}), under the least "
            f"{name} ({MIN_REQUEST_BYTES}): raise CACHEMESH_MAX_MESSAGE_BYTES to at least "
            f"{MIN_REQUEST_BYTES * REQUEST_SHARE}"
        )
    value = env.bytes(name, default_request_bytes(max_message_bytes), minimum=MIN_REQUEST_BYTES)
    if value > most:
        raise ConfigError(
            f"{name} ({value}) must be at most half of CACHEMESH_MAX_MESSAGE_BYTES "
            f"({max_message_bytes}), {most}: {why}; raise CACHEMESH_MAX_MESSAGE_BYTES (every "
            f"service's) to at least {value * REQUEST_SHARE}, or lower this"
        )
    return value


def idempotency_max_bytes(env: Env) -> int:
    """ROUTER_IDEMPOTENCY_MAX_BYTES: the answer-once table's answers, in serialized bytes
    (``0``: an answer is kept only while its call runs, for the duplicates awaiting it)."""
    return env.bytes("ROUTER_IDEMPOTENCY_MAX_BYTES", DEFAULT_MAX_BYTES)


def choice_from_env(env: Env) -> ChoiceSettings:
    policy = env.str("ROUTER_REPLICA_POLICY", "ttft")
    if policy not in POLICIES:
        raise ConfigError(
            f"ROUTER_REPLICA_POLICY must be one of {', '.join(POLICIES)}, got {policy[:64]!r}"
        )
    return ChoiceSettings(
        policy=policy,
        sglang=BalancePolicy(
            abs_threshold=env.count("ROUTER_BALANCE_ABS_THRESHOLD", 64),
            rel_threshold=env.within(
                "ROUTER_BALANCE_REL_THRESHOLD", 1.5, 1.0, MAX_LOAD_RATIO, "a ratio of loads"
            ),
            cache_threshold=env.float("ROUTER_CACHE_THRESHOLD", 0.3, minimum=0.0, maximum=1.0),
        ),
        ttft=TtftPolicy(
            tie_fraction=env.fraction("ROUTER_TTFT_TIE_FRACTION", 0.0),
            tie_floor_s=env.seconds("ROUTER_TTFT_TIE_FLOOR_S", 0.02, minimum=0.0),
            prior_prefill_tps=env.within(
                "ROUTER_TTFT_PRIOR_PREFILL_TPS", 10_000.0, 1.0, MAX_TOKENS_PER_S, "tokens a second"
            ),
            work_weight=env.within(
                "ROUTER_TTFT_WORK_WEIGHT", 1.0, 0.0, MAX_WORK_WEIGHT, "a weight of the queue"
            ),
            kv_capacity_tokens=kv_capacity_from_env(env),
        ),
        ejection=ejection_from_env(env),
    )


def kv_capacity_from_env(env: Env) -> int | None:
    """``ROUTER_KV_CAPACITY_TOKENS``: each model replica's KV cache in tokens, for the ttft
    policy's eviction model (unset: no eviction model). Below one KV block no prefix can be
    held, so such a capacity is refused rather than modelled."""
    if env.optional_str(KV_CAPACITY_VAR) is None:
        return None
    capacity = env.tokens(KV_CAPACITY_VAR, BLOCK_SIZE, minimum=None)
    if capacity < BLOCK_SIZE:
        raise ConfigError(
            f"{KV_CAPACITY_VAR} must be at least {BLOCK_SIZE} (one {BLOCK_SIZE}-token KV block), "
            f"got {capacity}: it is each model replica's KV cache in tokens "
            f"(MODEL_KV_CAPACITY_BLOCKS x {BLOCK_SIZE}); unset it to turn the eviction model off"
        )
    return capacity


def ejection_from_env(env: Env) -> EjectionPolicy:
    base_s = env.seconds("ROUTER_EJECT_BASE_S", 5.0, minimum=0.001)
    max_s = env.seconds("ROUTER_EJECT_MAX_S", 300.0, minimum=0.001)
    if max_s < base_s:
        raise ConfigError(
            f"ROUTER_EJECT_MAX_S ({max_s:g}) must be at least ROUTER_EJECT_BASE_S ({base_s:g}): "
            "the cool-off starts at the base and doubles up to the max"
        )
    return EjectionPolicy(
        after_failures=env.count("ROUTER_EJECT_AFTER_FAILURES", 3),
        base_s=base_s,
        max_s=max_s,
    )


def parse_tier_thresholds(env: Env, table: ModelTable) -> dict[Tier, float]:
    """``ROUTER_TIER_THRESHOLDS``: ``tier=threshold,...`` for tiers between small and large
    (the largest's is ROUTER_THRESHOLD), each within [-1, 1]."""
    value = env.optional_str("ROUTER_TIER_THRESHOLDS")
    middle = [t for t in table.tiers if t not in (SMALLEST, LARGEST)]
    out: dict[Tier, float] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        tier, sep, figure = item.strip().partition("=")
        if not sep or tier not in middle or not figure.strip():
            named = ", ".join(middle) if middle else "none: the table has two tiers"
            raise ConfigError(
                f"ROUTER_TIER_THRESHOLDS: expected tier=threshold for a tier between small and "
                f"large (the table's: {named}; large's is ROUTER_THRESHOLD), got "
                f"{item.strip()[:64]!r}"
            )
        out[tier] = Env({"ROUTER_TIER_THRESHOLDS": figure}).float(
            "ROUTER_TIER_THRESHOLDS", 0.0, minimum=-1.0, maximum=1.0
        )
    return out


def parse_replicas(value: str, table: ModelTable) -> dict[str, tuple[str, ...]]:
    """``sim-small=host:port,sim-large=host:port,...``; a model listed twice has two replicas
    (at two addresses: one address listed twice for one model is refused)."""
    replicas: dict[str, list[str]] = {}
    for item in value.split(","):
        model, sep, address = item.strip().partition("=")
        if not sep or not model or not address:
            raise ConfigError(f"MODEL_REPLICAS: expected model=host:port, got {item.strip()!r}")
        if table.get(model) is None:
            raise ConfigError(f"MODEL_REPLICAS: model {model!r} is not in the model table")
        Env({"MODEL_REPLICAS": address}).address("MODEL_REPLICAS")
        if address in replicas.get(model, ()):  # one process counted as two replicas
            raise ConfigError(f"MODEL_REPLICAS: {model}={address} is listed twice")
        replicas.setdefault(model, []).append(address)
    for tier, model in table.auto.items():
        if model not in replicas:
            raise ConfigError(f"MODEL_REPLICAS: no replica for {model!r}, the auto {tier} tier")
    return {model: tuple(addresses) for model, addresses in replicas.items()}
