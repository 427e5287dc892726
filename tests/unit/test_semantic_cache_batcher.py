"""Micro-batching: concurrent texts share embedding calls; results go to the right caller."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache.batcher import STORE_EVERY, MicroBatcher, QueueFull
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import Vectors
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


class HeldEmbedder(FakeEmbedder):
    """Holds a batch with a text starting "hold" until ``go`` is set (a busy embedder); keeps
    the texts it embedded."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.holding = threading.Event()
        self.go = threading.Event()

    def embed(self, texts: list[str]) -> Vectors:
        if any(text.startswith("hold") for text in texts):
            self.holding.set()
            self.go.wait(timeout=10)  # a safety net only: the test sets it
        self.texts.extend(texts)
        return super().embed(texts)

    async def held(self) -> None:
        """Returns once the held batch runs (its thread waits for ``go``)."""
        await asyncio.to_thread(self.holding.wait, 10)


@dataclass
class Events:
    """What the batcher reports (its metrics)."""

    queue: list[int] = field(default_factory=list)
    shed_calls: list[str] = field(default_factory=list)
    dropped_calls: list[str] = field(default_factory=list)

    @property
    def shed(self) -> int:
        return len(self.shed_calls)

    @property
    def dropped(self) -> int:
        return len(self.dropped_calls)

    def embedded(self, texts: int, seconds: float) -> None:
        pass

    def embed_queue(self, texts: int) -> None:
        self.queue.append(texts)

    def embed_shed(self, call: str) -> None:
        self.shed_calls.append(call)

    def embed_dropped(self, call: str) -> None:
        self.dropped_calls.append(call)


@dataclass
class Seconds:
    """The batcher's clock: it moves only when a test moves it."""

    now: float = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_text_whose_caller_went_before_its_batch_is_not_embedded() -> None:
    embedder, events = HeldEmbedder(), Events()
    batcher = MicroBatcher(embedder, events=events)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder"))
    await embedder.held()
    gone = asyncio.ensure_future(batcher.embed_one("a caller that gives up"))
    stays = asyncio.ensure_future(batcher.embed_one("a caller that waits"))
    await asyncio.sleep(0)
    assert batcher.queued == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert batcher.queued == 1  # out of the queue at once: it holds no place of a live caller
    embedder.go.set()
    await asyncio.gather(busy, stays)
    assert gone.cancelled()
    assert embedder.texts == ["hold the embedder", "a caller that waits"]
    assert events.dropped == 1 and events.queue[-1] == 0


async def test_a_text_past_its_callers_deadline_is_dropped_and_the_caller_told() -> None:
    embedder, events, clock = HeldEmbedder(), Events(), Seconds()
    batcher = MicroBatcher(embedder, events=events, clock=clock)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder"))
    await embedder.held()
    late = asyncio.ensure_future(batcher.embed_one("a question with 1 s left", within_s=1.0))
    in_time = asyncio.ensure_future(batcher.embed_one("a question with 9 s left", within_s=9.0))
    await asyncio.sleep(0)
    clock.now += 2.0  # the held batch took 2 s
    embedder.go.set()
    await asyncio.gather(busy, in_time)
    with pytest.raises(TimeoutError):
        await late
    assert embedder.texts == ["hold the embedder", "a question with 9 s left"]
    assert events.dropped == 1


async def test_no_time_left_is_a_timeout_before_anything_is_queued() -> None:
    embedder = FakeEmbedder()
    batcher = MicroBatcher(embedder)
    with pytest.raises(TimeoutError):
        await batcher.embed_one("too late", within_s=0.0)
    assert embedder.calls == 0


async def test_beyond_max_queue_a_text_is_refused_at_once() -> None:
    embedder, events = HeldEmbedder(), Events()
    batcher = MicroBatcher(embedder, max_queue=2, events=events)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder"))
    await embedder.held()
    queued = [asyncio.ensure_future(batcher.embed_one(f"queued {i}")) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="busy"):
        await batcher.embed_one("one too many")
    assert events.shed == 1
    queued[0].cancel()  # a caller goes: its place is free again
    await asyncio.sleep(0)
    admitted = asyncio.ensure_future(batcher.embed_one("admitted"))
    embedder.go.set()
    await asyncio.gather(busy, queued[1], admitted)
    assert "one too many" not in embedder.texts and "queued 0" not in embedder.texts
    assert events.shed == 1 and events.dropped == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(FakeEmbedder(), max_batch=0)
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(FakeEmbedder(), max_queue=0)
    with pytest.raises(ValueError, match="would not compare"):
        MicroBatcher(FakeEmbedder(), solo=FakeEmbedder(version="fake@2"))


class BatchesEmbedder(HeldEmbedder):
    """A held embedder that keeps each batch's texts."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def embed(self, texts: list[str]) -> Vectors:
        self.batches.append(list(texts))
        return super().embed(texts)


async def test_a_tenants_burst_delays_another_tenants_text_by_one_batch_not_the_burst() -> None:
    embedder = BatchesEmbedder()
    batcher = MicroBatcher(embedder, max_batch=3)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder", "a"))
    await embedder.held()
    waiting = [asyncio.ensure_future(batcher.embed_one(f"a{i}", "a")) for i in range(9)]
    waiting += [asyncio.ensure_future(batcher.embed_one(f"b{i}", "b")) for i in range(2)]
    waiting.append(asyncio.ensure_future(batcher.embed_one("c0", "c")))
    await asyncio.sleep(0)
    embedder.go.set()
    await asyncio.gather(busy, *waiting)
    # each batch takes the tenants' oldest texts in turn (before: a0 a1 a2, ..., b0 b1 c0)
    assert embedder.batches[1:4] == [["a0", "b0", "c0"], ["a1", "b1", "a2"], ["a3", "a4", "a5"]]


async def test_lookups_go_ahead_of_stores_which_keep_a_share() -> None:
    embedder = BatchesEmbedder()
    batcher = MicroBatcher(embedder, max_batch=STORE_EVERY + 1)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder", "a", store=True))
    await embedder.held()
    stores = [
        asyncio.ensure_future(batcher.embed_one(f"store {i}", "a", store=True))
        for i in range(2 * STORE_EVERY)
    ]
    lookups = [
        asyncio.ensure_future(batcher.embed_one(f"lookup {i}", "a")) for i in range(2 * STORE_EVERY)
    ]
    await asyncio.sleep(0)
    embedder.go.set()
    await asyncio.gather(busy, *stores, *lookups)
    # queued after the Stores, the Lookups go first; a Store after every STORE_EVERY of them
    first = embedder.batches[1]
    assert first == [f"lookup {i}" for i in range(STORE_EVERY)] + ["store 0"]


async def test_a_tenant_fills_its_part_of_the_queue_and_others_still_get_in() -> None:
    embedder, events = HeldEmbedder(), Events()
    batcher = MicroBatcher(embedder, max_queue=4, max_tenant_queue=2, events=events)
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder", "a"))
    await embedder.held()
    mine = [
        asyncio.ensure_future(batcher.embed_one("a lookup", "a")),
        asyncio.ensure_future(batcher.embed_one("a store", "a", store=True)),
    ]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="of this tenant"):
        await batcher.embed_one("one too many of a's", "a", store=True)
    others = [asyncio.ensure_future(batcher.embed_one(f"b{i}", "b")) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued == 4
    with pytest.raises(QueueFull, match="SEMANTIC_CACHE_EMBED_MAX_QUEUE\\)"):
        await batcher.embed_one("c0", "c")
    assert events.shed_calls == ["store", "lookup"]
    embedder.go.set()
    await asyncio.gather(busy, *mine, *others)


def test_a_tenants_part_of_the_queue_is_at_most_the_queue() -> None:
    with pytest.raises(ValueError, match="max_tenant_queue <= max_queue"):
        MicroBatcher(FakeEmbedder(), max_queue=4, max_tenant_queue=5)
