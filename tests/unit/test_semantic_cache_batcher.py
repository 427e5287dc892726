"""Micro-batching: concurrent texts share embedding calls; results go to the right caller."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache.batcher import MicroBatcher
from services.semantic_cache.cache import SemanticCache
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer, q


async def test_concurrent_texts_share_calls_and_each_gets_its_own_row() -> None:
    embedder = FakeEmbedder()
    batcher = MicroBatcher(embedder, max_batch=4)
    texts = [f"question number {i}" for i in range(10)]
    rows = await asyncio.gather(*(batcher.embed_one(t) for t in texts))
    assert embedder.calls == batcher.batches <= 4  # 1 alone, then batches of <= 4
    for text, row in zip(texts, rows, strict=True):
        assert np.array_equal(row, embedder.embed([text])[0])


async def test_an_idle_text_is_embedded_at_once_alone() -> None:
    embedder = FakeEmbedder()
    batcher = MicroBatcher(embedder)
    await batcher.embed_one("one")
    await batcher.embed_one("two")
    assert batcher.batches == 2


async def test_a_failing_embedder_fails_every_waiter_of_the_batch() -> None:
    class Broken(FakeEmbedder):
        def embed(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("onnxruntime exploded")

    batcher = MicroBatcher(Broken())
    results = await asyncio.gather(
        *(batcher.embed_one(f"t{i}") for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_the_cache_embeds_through_the_batcher() -> None:
    embedder = FakeEmbedder()
    batcher = MicroBatcher(embedder, max_batch=8)
    cache = SemanticCache(embedder, ManualClock(), threshold=0.8, batcher=batcher)
    questions = [f"how do i do thing {i}" for i in range(6)]
    await asyncio.gather(*(cache.store(q(t), answer()) for t in questions))
    assert len(cache) == 6 and batcher.batches < 6
    assert (await cache.check(q("how do i do thing 3 please"))).hit


async def test_a_lone_text_runs_on_the_solo_embedder_and_a_batch_does_not() -> None:
    main, solo = FakeEmbedder(), FakeEmbedder()
    batcher = MicroBatcher(main, solo=solo, max_batch=8)
    row = await batcher.embed_one("alone at last")
    assert (solo.calls, main.calls, batcher.solo_batches) == (1, 0, 1)
    assert np.array_equal(row, main.embed(["alone at last"])[0])
    main.calls = 0
    # six asked together: all queued before the batch starts, so they run as one
    await asyncio.gather(*(batcher.embed_one(f"text {i}") for i in range(6)))
    assert (solo.calls, main.calls, batcher.solo_batches) == (1, 1, 1)


async def test_a_queued_single_text_does_not_take_the_solo_embedder() -> None:
    # max_batch 1: every batch holds one text, but while texts wait behind it, the service
    # is busy and the batch runs on the main embedder's threads
    main, solo = FakeEmbedder(), FakeEmbedder()
    batcher = MicroBatcher(main, solo=solo, max_batch=1)
    await asyncio.gather(*(batcher.embed_one(f"text {i}") for i in range(4)))
    assert (solo.calls, main.calls) == (1, 3)  # only the last ran with nothing behind it


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(FakeEmbedder(), max_batch=0)
    with pytest.raises(ValueError, match="would not compare"):
        MicroBatcher(FakeEmbedder(), solo=FakeEmbedder(version="fake@2"))
