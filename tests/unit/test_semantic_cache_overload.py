"""Under overload a Lookup answers in time, never embedding or verifying for a caller gone.

The embedding queue may hold a Lookup past its caller's deadline (a burst): the Lookup then
answers a miss in time (it still leads, or reports ``pending``), and its text leaves the queue
unembedded. When the queue is full a Lookup skips L1 at once ("busy": the router goes on to the
model) and a Store stores nothing, neither failing. The clocks are fakes; nothing is timed.
"""

from __future__ import annotations

import asyncio

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.batcher import MicroBatcher
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import Vectors
from services.semantic_cache.leases import Leases
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
from tests.unit.test_semantic_cache_batcher import HeldEmbedder, Seconds

ANSWER = sc.CachedAnswer(
    content=[pb.ContentBlock(text="x")], model="sim-small", stop_reason="end_turn", output_tokens=3
)


def lookup(question: str, *, want_embedding: bool = False) -> sc.LookupRequest:
    return sc.LookupRequest(
        tenant="a", request=make_request(question), want_embedding=want_embedding
    )


def store(question: str) -> sc.StoreRequest:
    return sc.StoreRequest(tenant="a", request=make_request(question), answer=ANSWER)


def held_api(max_queue: int = 512) -> tuple[SemanticCacheApi, MicroBatcher, HeldEmbedder, Seconds]:
    clock, seconds, embedder = ManualClock(), Seconds(), HeldEmbedder()
    batcher = MicroBatcher(embedder, max_queue=max_queue, clock=seconds)
    cache = SemanticCache(
        embedder,
        clock,
        threshold=0.8,
        leases=Leases(clock, 30.0),
        batcher=batcher,
        deadline_clock=seconds,
    )
    return SemanticCacheApi(cache, lease_wait_s=30.0), batcher, embedder, seconds


async def queued(batcher: MicroBatcher, texts: int) -> None:
    for _ in range(100):
        if batcher.queued == texts:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{batcher.queued} texts queued, not {texts}")


async def test_a_lookup_queued_past_its_deadline_answers_a_miss_in_time_and_leads() -> None:
    api, batcher, embedder, seconds = held_api()
    assert (await api.store(store("how do i reset my password"))).stored
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder"))
    await embedder.held()
    reply = asyncio.ensure_future(api.lookup(lookup("how can i change my email address"), 2.0))
    await queued(batcher, 1)
    seconds.now += 2.0  # the batch ahead of it took the Lookup's whole deadline
    embedder.go.set()
    answered = await reply
    await busy
    assert not answered.hit and not answered.skip_reason
    assert answered.leader  # a miss like any other: this request calls the model, then stores
    assert "how can i change my email address" not in embedder.texts  # nobody waited for it


class SlowEmbedder(FakeEmbedder):
    """Embeds a text holding "slow" in 2.5 s of the deadlines' clock."""

    def __init__(self, seconds: Seconds) -> None:
        super().__init__()
        self._seconds = seconds

    def embed(self, texts: list[str]) -> Vectors:
        if any("slow" in text for text in texts):
            self._seconds.now += 2.5
        return super().embed(texts)


async def test_no_verification_runs_once_the_callers_time_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verified: list[str] = []
    verify = SemanticCache._verify

    async def counted(self: SemanticCache, short: list[object], text: str) -> list[str]:
        verified.append(text)
        return await verify(self, short, text)  # type: ignore[arg-type]

    monkeypatch.setattr(SemanticCache, "_verify", counted)
    clock, seconds = ManualClock(), Seconds()
    cache = SemanticCache(
        SlowEmbedder(seconds),
        clock,
        threshold=0.5,
        leases=Leases(clock, 30.0),
        deadline_clock=seconds,
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    assert (await api.store(store("slow reset of my password"))).stored
    # the embedding takes 2.5 s of a 2 s deadline: the paraphrase is not verified, not served
    late = await api.lookup(lookup("slow reset of my password please"), 2.0)
    assert not late.hit and late.leader and verified == []
    # with the time to verify it, it is served
    served = await api.lookup(lookup("slow reset of the password please"), None)
    assert served.hit and len(verified) == 1


async def test_a_full_queue_skips_l1_at_once_and_a_store_stores_nothing() -> None:
    api, batcher, embedder, _ = held_api(max_queue=1)
    assert (await api.store(store("how do i reset my password"))).stored
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder"))
    await embedder.held()
    waiting = asyncio.ensure_future(batcher.embed_one("a text that waits"))
    await queued(batcher, 1)
    # the router reads a skip as "no L1 answer": the model answers (no error, no fault)
    shed = await api.lookup(lookup("how can i change my email address", want_embedding=True), 2.0)
    assert shed.skip_reason.startswith("semantic-cache is busy")
    assert not (shed.hit or shed.leader or shed.pending or shed.embedding)
    refused = await api.store(store("how can i change my email address"))
    assert not refused.stored and refused.skip_reason.startswith("semantic-cache is busy")
    # the exact path needs no embedding: still served
    assert (await api.lookup(lookup("how do i reset my password"), 2.0)).hit
    embedder.go.set()
    await asyncio.gather(busy, waiting)


async def test_a_lookups_embedding_goes_ahead_of_a_stores_queued_before_it() -> None:
    api, batcher, embedder, _ = held_api()
    assert (await api.store(store("how do i reset my password"))).stored
    busy = asyncio.ensure_future(batcher.embed_one("hold the embedder", "a", store=True))
    await embedder.held()
    # a Store of another scope (a Lookup waits for its own scope's Stores in flight)
    other = sc.StoreRequest(
        tenant="a",
        request=make_request("where is my invoice for march", system="Another app."),
        answer=ANSWER,
    )
    storing = asyncio.ensure_future(api.store(other))
    await queued(batcher, 1)
    looking = asyncio.ensure_future(api.lookup(lookup("how can i change my email address"), 2.0))
    await queued(batcher, 2)
    embedder.go.set()
    await asyncio.gather(busy, storing, looking)
    assert embedder.texts[-2:] == [
        "how can i change my email address",
        "where is my invoice for march",
    ]
