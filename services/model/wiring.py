"""Builds a model replica's engine from its settings: the one wiring both ``serve()`` and the
offline estimator use (the estimator skips the sleeps, which only shape latency)."""

from __future__ import annotations

import asyncio

from services.common.tokens import Tokenizer, Tokenizers
from services.model.engine import SimEngine, Sleep
from services.model.kv_cache import KvBlockCache
from services.model.metrics import ModelMetrics
from services.model.settings import ModelSettings


def build_engine(
    settings: ModelSettings,
    tokenizer: Tokenizers | Tokenizer,
    kv_cache: KvBlockCache | None = None,
    sleep: Sleep = asyncio.sleep,
    metrics: ModelMetrics | None = None,
    instance: str = "",
) -> SimEngine:
    """``instance``: this run of the engine (``GenerateStart.engine_instance``; empty: not
    told, the offline estimator)."""
    return SimEngine(
        models=settings.models,
        replica_id=settings.replica_id,
        tokenizer=tokenizer,
        kv_cache=kv_cache if kv_cache is not None else KvBlockCache(settings.kv_capacity_blocks),
        time_scale=settings.time_scale,
        sleep=sleep,
        drafting=settings.drafting,
        watcher=metrics,
        waits=metrics.queue_wait if metrics is not None else None,
        instance=instance,
    )
