"""Builds the semantic cache from its settings: the one wiring both ``serve()`` and the
offline estimator use, so the two cannot drift (leases, micro-batching, the IVF switch)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.common.clock import Clock, MonotonicClock
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.batcher import MicroBatcher
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.cross_encoder import PairScorer, load_cross_encoder
from services.semantic_cache.embedder import Embedder
from services.semantic_cache.index import AnnSettings
from services.semantic_cache.leases import Leases
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.stats import StoreStats
from services.semantic_cache.tenant_policy import TenantPolicies
from services.semantic_cache.verifier import Verifier, VerifierWeights


def build_verifier(
    config: SemanticCacheSettings,
    embedder: Embedder | None = None,
    cross_encoder: PairScorer | None = None,
) -> Verifier:
    """The shipped weights, with the cross-encoder when they use it (blocking: a thread):
    ``cross_encoder``, else loaded here (a caller that builds many caches in one process, the
    offline replays, loads it once and hands it in); ``embedder`` compares the parts of two
    questions that differ after a shared opening (without it such a pair is refused)."""
    weights = VerifierWeights.load()
    scorer = None
    if weights.needs_cross_encoder:
        scorer = (
            cross_encoder
            if cross_encoder is not None
            else load_cross_encoder(threads=config.ort_threads)
        )
    return Verifier(weights, config.verifier_min_p, scorer, embedder=embedder)


def build_cache(
    config: SemanticCacheSettings,
    embedder: Embedder,
    clock: Clock,
    stats: StoreStats | None = None,
    metrics: SemanticCacheMetrics | None = None,
    verifier: Verifier | None = None,
    solo: Embedder | None = None,
    lease_clock: Clock | None = None,
) -> SemanticCache:
    """``stats`` and ``metrics``: the service's (None: the offline estimator's cache);
    ``verifier`` None = ``build_verifier(config, embedder)`` (loads the cross-encoder here);
    ``solo``: the embedder of a text embedded alone (None: ``embedder``); ``lease_clock``:
    what the single-flight leases age on (None: a ``MonotonicClock``, never the wall).
    ``ConfigError`` when the byte bound cannot hold one of ``embedder``'s entries."""
    config.check_max_bytes(embedder.dim)
    leases_age_on = lease_clock if lease_clock is not None else MonotonicClock()
    return SemanticCache(
        embedder,
        clock,
        threshold=config.threshold,
        ttl_s=config.ttl_s,
        max_entries=config.max_entries,
        max_bytes=config.max_bytes,
        verifier=verifier if verifier is not None else build_verifier(config, embedder),
        margin=config.ambiguity_margin,
        policy=config.policy,
        leases=Leases(leases_age_on, config.lease_s) if config.lease_wait_s > 0 else None,
        batcher=MicroBatcher(
            embedder,
            solo=solo,
            max_batch=config.embed_max_batch,
            max_queue=config.embed_max_queue,
            max_tenant_queue=config.embed_max_queue_per_tenant,
            events=metrics,
        ),
        ann=(
            AnnSettings(config.ann_min_entries, config.ann_nprobe, config.faiss_threads)
            if config.ann_min_entries > 0
            else None
        ),
        stats=stats,
        on_lease_wait=metrics.lease_waited if metrics is not None else None,
    )


def build_api(
    config: SemanticCacheSettings,
    cache: SemanticCache,
    draining: asyncio.Event | None = None,
    policies: TenantPolicies | None = None,
    metrics: SemanticCacheMetrics | None = None,
    on_drop: Callable[[], None] | None = None,
) -> SemanticCacheApi:
    """``policies``: the tenants' L1 policies (None: in memory, as for the offline estimator);
    ``on_drop``: hears of each Drop taken, even one that counted none (the snapshotter's
    ``dropped``)."""
    return SemanticCacheApi(
        cache,
        lease_wait_s=config.lease_wait_s,
        draining=draining,
        policies=policies,
        metrics=metrics,
        on_drop=on_drop,
    )
