"""prefix-cache configuration, read from the environment once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.auth import internal_token_from_env
from services.common.env import ConfigError, Env
from services.common.metrics import MetricsSettings
from services.common.redis_pool import max_connections
from services.common.server import ServerSettings
from services.common.tokens import CACHED_TOKENS, cache_tokens_from_env
from services.prefix_cache.commit_records import MIN_RECORD_TTL_MS

MIN_RECORD_TTL_S = MIN_RECORD_TTL_MS // 1000

DEFAULT_LISTEN = "127.0.0.1:50053"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9103"


@dataclass(frozen=True)
class PrefixCacheSettings:
    server: ServerSettings
    metrics: MetricsSettings
    internal_token: str
    lookback_blocks: int
    record_ttl_s: int
    max_warm_entries: int
    max_records: int
    redis_url: str | None  # set = warm prefixes, records, totals in Redis; unset = in process
    redis_max_connections: int  # the most connections its Redis client may hold
    replica_capacity_blocks: int  # the KV capacity assumed per model replica (L3 view)
    plan_ttl_s: int  # how long a Plan's computed prompt waits for its WARM commit (0 = off)
    plan_memo_blocks: int  # the kept plans' budget, in KV block hashes' worth (core.Prompt.weight)
    # the recent prompts' KV block hashes kept, so a next turn hashes only its new blocks
    kv_memo_hashes: int = 1_000_000
    # each vocabulary's encoding cache, in tokens' worth (CACHEMESH_TOKENIZER_CACHE_TOKENS)
    tokenizer_cache_tokens: int = CACHED_TOKENS
    # a replica's L3 view is dropped once no Plan named it and no WARM served on it this long
    replica_idle_s: int = 86400

    @classmethod
    def from_env(cls, env: Env) -> PrefixCacheSettings:
        settings = cls(
            server=ServerSettings.from_env(env, "PREFIX_CACHE", DEFAULT_LISTEN),
            metrics=MetricsSettings.from_env(env, "PREFIX_CACHE", DEFAULT_METRICS_LISTEN),
            internal_token=internal_token_from_env(env),
            lookback_blocks=_lookback_blocks(env),
            record_ttl_s=_record_ttl_s(env),
            max_warm_entries=env.count("PREFIX_CACHE_MAX_WARM_ENTRIES", 1_000_000, minimum=1),
            max_records=env.count("PREFIX_CACHE_MAX_RECORDS", 1_000_000, minimum=1),
            redis_url=env.redis_url("PREFIX_CACHE_REDIS_URL"),
            redis_max_connections=max_connections(env, "PREFIX_CACHE_REDIS_MAX_CONNECTIONS"),
            replica_capacity_blocks=env.count(
                "PREFIX_CACHE_REPLICA_CAPACITY_BLOCKS", 65536, minimum=1
            ),
            plan_ttl_s=env.whole_seconds("PREFIX_CACHE_PLAN_TTL_S", 600),
            plan_memo_blocks=env.count("PREFIX_CACHE_PLAN_MEMO_BLOCKS", 1_000_000),
            kv_memo_hashes=env.count("PREFIX_CACHE_KV_MEMO_HASHES", 1_000_000),
            tokenizer_cache_tokens=cache_tokens_from_env(env),
            replica_idle_s=env.whole_seconds("PREFIX_CACHE_REPLICA_IDLE_S", 86400, minimum=1),
        )
        if settings.replica_idle_s < settings.plan_ttl_s:
            raise ConfigError(
                f"PREFIX_CACHE_REPLICA_IDLE_S ({settings.replica_idle_s}) must be >= "
                f"PREFIX_CACHE_PLAN_TTL_S ({settings.plan_ttl_s}): a replica's L3 view would be "
                "dropped while a Plan that named it still waits for its WARM, whose figures "
                "of the view are then of one dropped. Raise PREFIX_CACHE_REPLICA_IDLE_S "
                "(default 86400) or lower PREFIX_CACHE_PLAN_TTL_S"
            )
        return settings


def _record_ttl_s(env: Env) -> int:
    # at most MAX_DURATION_S: Redis refused a longer one's milliseconds at every WARM commit
    ttl_s = env.whole_seconds("PREFIX_CACHE_RECORD_TTL_S", 86400, minimum=None)
    if ttl_s < MIN_RECORD_TTL_S:
        raise ConfigError(
            f"PREFIX_CACHE_RECORD_TTL_S must be >= {MIN_RECORD_TTL_S} (an hour), got {ttl_s}: "
            "a commit record must outlive the longest answer and the router's billing outbox "
            "replays, or the answer's FINAL finds no WARM commit and is never billed"
        )
    return ttl_s


def _lookback_blocks(env: Env) -> int:
    blocks = env.count("PREFIX_CACHE_LOOKBACK_BLOCKS", 20, minimum=None)
    if blocks < 1:
        raise ConfigError(
            f"PREFIX_CACHE_LOOKBACK_BLOCKS must be >= 1, got {blocks}: it counts the block "
            "positions checked at each breakpoint, the breakpoint itself included (1 = only "
            "the breakpoint; Anthropic checks 20)"
        )
    return blocks
