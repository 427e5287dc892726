"""Builds prefix-cache's core from its settings: the one wiring both ``serve()`` and the
offline estimator use, so the two cannot drift."""

from __future__ import annotations

from redis.asyncio import Redis

from services.common.clock import Clock
from services.common.kv_blocks import KvHashMemo
from services.common.models import ModelTable
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, Prompt, TokenizerSlot
from services.prefix_cache.ledger import CommitLedger, InMemoryLedger
from services.prefix_cache.metrics import PrefixCacheMetrics
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.redis_ledger import RedisCommitLedger
from services.prefix_cache.redis_store import RedisWarmStore
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore, WarmStore


def build_core(
    settings: PrefixCacheSettings,
    table: ModelTable,
    tokenizer: TokenizerSlot,
    clock: Clock,
    redis: Redis | None = None,
    metrics: PrefixCacheMetrics | None = None,
) -> PrefixCacheCore:
    """With ``redis``, warm prefixes, commit records and totals are all shared through it;
    ``metrics``: the service's (None: the offline estimator)."""
    record_ttl_ms = settings.record_ttl_s * 1000
    cache: WarmStore = InMemoryWarmStore(settings.max_warm_entries)
    ledger: CommitLedger = InMemoryLedger(
        CommitRecords(record_ttl_ms, settings.max_records), TotalsLedger()
    )
    if redis is not None:
        cache = RedisWarmStore(redis)
        ledger = RedisCommitLedger(redis, record_ttl_ms)
    plans: PlanMemo[Prompt] = PlanMemo(
        clock, ttl_ms=settings.plan_ttl_s * 1000, max_blocks=settings.plan_memo_blocks
    )
    return PrefixCacheCore(
        table=table,
        tokenizer=tokenizer,
        cache=cache,
        views=ReplicaViews(
            settings.replica_capacity_blocks,
            clock=clock,
            idle_ms=settings.replica_idle_s * 1000,
        ),
        ledger=ledger,
        clock=clock,
        lookback=settings.lookback_blocks,
        plans=plans,
        metrics=metrics,
        kv_memo=KvHashMemo(settings.kv_memo_hashes),
    )
