"""A Lookup whose embedding is skipped (the queue full, or no time left) writes at most one
INFO line an interval, saying how many it did not write, not one a Lookup: under shedding (an
``auto`` request wants the embedding after its check was shed) a ``make up`` stack with a
2-text queue wrote 81 such lines for 400 requests at 24 in flight, in 7 s, every one the same
but for the tenant (``cachemesh_semantic_cache_embed_shed_total`` counts them all)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.clock import ManualClock
from services.semantic_cache.api import EMBED_SKIPPED_LOG_EVERY_MS, SemanticCacheApi
from services.semantic_cache.batcher import MicroBatcher
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_batcher import HeldEmbedder, Seconds
from tests.unit.test_semantic_cache_overload import lookup, queued

FULL = "the embedding queue is full"


async def test_a_shed_embedding_is_logged_once_an_interval_with_the_count_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, seconds, embedder, lines = ManualClock(), Seconds(), HeldEmbedder(), ManualClock()
    batcher = MicroBatcher(embedder, max_queue=1, clock=seconds)
    cache = SemanticCache(
        embedder,
        clock,
        threshold=0.8,
        leases=Leases(clock, 30.0),
        batcher=batcher,
        deadline_clock=seconds,
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0, log_clock=lines)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder"))
    await embedder.held()
    waiting = asyncio.ensure_future(batcher.embed_one("a text that waits"))
    await queued(batcher, 1)
    caplog.set_level(logging.INFO, logger="cachemesh.semantic_cache")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if FULL in r.getMessage()]

    for n in range(50):
        shed = await api.lookup(lookup(f"question {n} about my account", want_embedding=True), 2)
        assert not shed.embedding  # each one without it, as before
    assert len(logged()) == 1
    lines.advance(ms=EMBED_SKIPPED_LOG_EVERY_MS)
    await api.lookup(lookup("one more question about my account", want_embedding=True), 2)
    assert len(logged()) == 2 and "(49 more since the last such line" in logged()[-1]
    embedder.go.set()
    await asyncio.gather(busy, waiting)


async def test_a_lease_ended_for_a_reply_too_late_is_logged_once_an_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same for the leases ended because the leading Lookup's reply did not reach its
    caller (its own deadline, or a cancel: what callers do to themselves): 33 lines for 400
    requests with 30 ms deadlines on the same stack, in 0.6 s, before."""
    clock, lines = ManualClock(), ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    api = SemanticCacheApi(cache, lease_wait_s=30.0, log_clock=lines)
    caplog.set_level(logging.INFO, logger="cachemesh.semantic_cache")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "did not reach" in r.getMessage()]

    for n in range(20):
        asked = lookup(f"question {n} about my invoice")
        led = await api.lookup(asked, None)
        assert led.leader and api.abandon("a", led.lease_id, asked.request.request_id)
    assert len(logged()) == 1
    lines.advance(ms=EMBED_SKIPPED_LOG_EVERY_MS)
    asked = lookup("one more question about my invoice")
    led = await api.lookup(asked, None)
    assert api.abandon("a", led.lease_id, asked.request.request_id)
    assert len(logged()) == 2 and "(19 more since the last such line" in logged()[-1]
