"""A Lookup waiting on an identical request's lease ends within its caller's deadline.

What a lookup spends before its lease wait (the wait for its scope's Stores in flight, an
embedding) comes out of that wait, so the router gets ``pending`` in time instead of
DEADLINE_EXCEEDED (which it counts as L1 degraded, then calls the model a second time). The
deadlines' clock is a fake; what each wait was given is recorded, never timed.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache import cache as cache_module
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import Vectors
from services.semantic_cache.inflight import ScopeKey, StoresInFlight
from services.semantic_cache.leases import Leases
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

ANSWER = sc.CachedAnswer(
    content=[pb.ContentBlock(text="x")], model="sim-small", stop_reason="end_turn", output_tokens=3
)


@dataclass
class FakeClock:
    """The deadlines' clock (seconds): it moves only when a test moves it."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


class HeldEmbedder(FakeEmbedder):
    """Embeds a text holding "slow" once ``go`` is set, taking 0.8 s of the clock (a busy
    embedding queue)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.go = threading.Event()
        self._clock = clock

    def embed(self, texts: list[str]) -> Vectors:
        if any("slow" in text for text in texts):
            self.go.wait(timeout=10)  # a safety net only: the test sets it
            self._clock.now += 0.8
        return super().embed(texts)


@pytest.fixture
def lease_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each lease wait's budget; the wait itself times out at once."""
    budgets: list[float] = []

    async def timed_out(event: asyncio.Event, budget_s: float) -> bool:
        budgets.append(budget_s)
        return False

    monkeypatch.setattr(cache_module, "wait", timed_out)
    return budgets


def lookup(question: str) -> sc.LookupRequest:
    return sc.LookupRequest(tenant="a", request=make_request(question))


async def test_the_lease_wait_gets_what_the_wait_for_stores_left_of_the_deadline(
    lease_waits: list[float],
) -> None:
    clock, deadlines = ManualClock(), FakeClock()
    embedder = HeldEmbedder(deadlines)
    leases = Leases(clock, 30.0)
    cache = SemanticCache(embedder, clock, threshold=0.8, leases=leases, deadline_clock=deadlines)
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    assert (await api.lookup(lookup("Reset my password"), 2.0)).leader
    # another question of the same scope is being stored (its embedding is queued)
    other = sc.StoreRequest(tenant="a", request=make_request("slow other question"), answer=ANSWER)
    storing = asyncio.ensure_future(api.store(other))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(api.lookup(lookup("Reset my password"), 2.0))
    await asyncio.sleep(0)  # the waiter waits for the scope's Store now
    embedder.go.set()
    reply = await waiter
    assert (await storing).stored
    assert reply.pending and not reply.leader
    # 2 s less the 100 ms reply margin, less the 0.8 s the Store took
    assert lease_waits == [pytest.approx(1.1)]


async def test_the_wait_for_stores_in_flight_ends_at_the_deadline(
    lease_waits: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, deadlines = ManualClock(), FakeClock()
    settles: list[float] = []

    async def slow_store(self: StoresInFlight, key: ScopeKey, timeout_s: float) -> None:
        settles.append(timeout_s)  # a Store in flight that outlasts the wait
        deadlines.now += timeout_s

    monkeypatch.setattr(StoresInFlight, "settled", slow_store)
    leases = Leases(clock, 30.0)
    cache = SemanticCache(
        FakeEmbedder(), clock, threshold=0.8, leases=leases, deadline_clock=deadlines
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    assert (await api.lookup(lookup("Reset my password"), 2.0)).leader
    settles.clear()
    reply = await api.lookup(lookup("Reset my password"), 0.5)
    assert reply.pending
    assert settles == [pytest.approx(0.4)]  # 0.5 s less the reply margin, not a whole second
    assert lease_waits == []  # nothing left to wait on the lease


async def test_without_a_deadline_the_lease_wait_is_the_setting(lease_waits: list[float]) -> None:
    clock = ManualClock()
    leases = Leases(clock, 30.0)
    cache = SemanticCache(
        FakeEmbedder(), clock, threshold=0.8, leases=leases, deadline_clock=FakeClock()
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    assert (await api.lookup(lookup("Reset my password"), None)).leader
    assert (await api.lookup(lookup("Reset my password"), None)).pending
    assert lease_waits == [30.0]


class SlowEmbedder(FakeEmbedder):
    """Embeds a text holding "slow" in 0.8 s of the deadlines' clock (a busy embedding queue)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock

    def embed(self, texts: list[str]) -> Vectors:
        if any("slow" in text for text in texts):
            self._clock.now += 0.8
        return super().embed(texts)


@pytest.fixture
def whole_lease_waits(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The deadlines' clock; each lease wait times out, its whole budget gone on that clock."""
    deadlines = FakeClock()

    async def timed_out(event: asyncio.Event, budget_s: float) -> bool:
        deadlines.now += budget_s
        return False

    monkeypatch.setattr(cache_module, "wait", timed_out)
    return deadlines


def auto_lookup(question: str) -> sc.LookupRequest:
    """``auto``'s Lookup: a miss also returns the question's embedding (the tier router's)."""
    return sc.LookupRequest(tenant="a", request=make_request(question), want_embedding=True)


async def test_an_embedding_after_a_whole_lease_wait_is_left_out_not_late(
    whole_lease_waits: FakeClock,
) -> None:
    """The check computed no embedding (its scope holds nothing yet) and waited out its budget
    on an identical request's lease: embedding now would answer 0.8 s past the deadline (the
    router would count L1 as down and lose the ``pending``); the reply goes without it."""
    deadlines = whole_lease_waits
    clock = ManualClock()
    cache = SemanticCache(
        SlowEmbedder(deadlines),
        clock,
        threshold=0.8,
        leases=Leases(clock, 30.0),
        deadline_clock=deadlines,
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    assert (await api.lookup(lookup("slow reset of my password"), 2.0)).leader
    began = deadlines.now
    reply = await api.lookup(auto_lookup("slow reset of my password"), 2.0)
    assert reply.pending and not reply.embedding
    assert deadlines.now - began <= 2.0 - 0.1  # the reply leaves within its margin


async def test_an_embedding_the_check_computed_is_sent_whenever_the_reply_is(
    whole_lease_waits: FakeClock,
) -> None:
    """The scope holds an entry, so the check embedded the question (before its lease wait,
    which got that much less): the reply reuses that vector, in time."""
    deadlines = whole_lease_waits
    clock = ManualClock()
    cache = SemanticCache(
        SlowEmbedder(deadlines),
        clock,
        threshold=0.8,
        leases=Leases(clock, 30.0),
        deadline_clock=deadlines,
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    store = sc.StoreRequest(tenant="a", request=make_request("Cancel my plan"), answer=ANSWER)
    assert (await api.store(store)).stored
    assert (await api.lookup(lookup("slow reset of my password"), 2.0)).leader
    began = deadlines.now
    reply = await api.lookup(auto_lookup("slow reset of my password"), 2.0)
    assert reply.pending and reply.embedding and reply.embedder_version == "fake@1"
    assert deadlines.now - began == pytest.approx(2.0 - 0.1)


async def test_an_embedding_that_does_not_come_in_time_is_left_out() -> None:
    """A leader's reply (no lease wait) whose embedding is stuck behind a busy embedder: the
    reply goes without it within the deadline, the lease still taken."""
    embedder = HeldEmbedder(FakeClock())  # "slow" texts wait for ``go``, never set here
    clock = ManualClock()
    cache = SemanticCache(embedder, clock, threshold=0.8, leases=Leases(clock, 30.0))
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    try:
        reply = await asyncio.wait_for(api.lookup(auto_lookup("slow question"), 0.3), 5)
    finally:
        embedder.go.set()  # the embedder's thread ends
    assert reply.leader and reply.lease_id and not reply.embedding


async def test_with_time_left_a_miss_carries_its_embedding() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    for remaining_s in (2.0, None):
        reply = await api.lookup(auto_lookup("Reset my password"), remaining_s)
        assert not reply.hit and len(reply.embedding) == 4 * 64


async def test_a_wall_clock_step_neither_cuts_nor_stretches_a_lease_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a lease wait has spent is read on the deadlines' (monotonic) clock: before, it was
    read on the wall clock, so an NTP step forward of an hour ended the wait of a request at
    once (it called the model a second time) and a step back stretched it past the setting."""
    clock, deadlines = ManualClock(), FakeClock()
    leases = Leases(ManualClock(), 30.0)  # the leases' own clock, which no step moves
    cache = SemanticCache(
        FakeEmbedder(), clock, threshold=0.8, leases=leases, deadline_clock=deadlines
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    first = await api.lookup(lookup("Reset my password"), None)
    assert first.leader
    budgets: list[float] = []

    async def handed_over(event: asyncio.Event, budget_s: float) -> bool:
        """The first wait: a second passes (and the wall clock steps an hour forward) while
        the leader's call fails (released) and an identical request takes the next lease."""
        budgets.append(budget_s)
        if len(budgets) > 1:
            return False
        deadlines.now += 1.0
        clock.advance(s=3600.0)
        release = sc.ReleaseRequest(
            tenant="a", request=make_request("Reset my password"), lease_id=first.lease_id
        )
        assert (await api.release(release)).released
        assert (await api.lookup(lookup("Reset my password"), None)).leader
        return True

    monkeypatch.setattr(cache_module, "wait", handed_over)
    reply = await api.lookup(lookup("Reset my password"), None)
    assert reply.pending
    assert budgets == [30.0, pytest.approx(29.0)]  # before: [30.0], the wait cut short


@pytest.mark.parametrize("age_s", [0.0, 13.5, 15.3, 28.0, 29.5, 29.99])
async def test_a_lease_near_its_age_limit_bounds_no_wait_past_the_deadline(age_s: float) -> None:
    """A fuzz review saw a Lookup on a 28-30 s old lease answer after its 15 s deadline.
    Whatever the lease's age, on both clocks (the leases' and the deadlines'), the wait ends
    within the caller's deadline less the reply margin: pending while the lease lives, the
    lead once it reached its age limit."""
    clock, deadlines = ManualClock(), FakeClock()
    budgets: list[float] = []

    async def timed_out(event: asyncio.Event, budget_s: float) -> bool:
        budgets.append(budget_s)
        deadlines.now += budget_s
        clock.advance(s=budget_s)
        return event.is_set()

    cache = SemanticCache(
        FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0), deadline_clock=deadlines
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_module, "wait", timed_out)
        assert (await api.lookup(lookup("Reset my password"), 5.0)).leader
        clock.advance(s=age_s)
        deadlines.now += age_s
        began = deadlines.now
        reply = await api.lookup(lookup("Reset my password"), 15.0)
    assert deadlines.now - began <= 15.0 - 0.1 + 1e-9
    lives = age_s + 14.9 < 30.0
    assert (reply.pending, reply.leader) == (lives, not lives)
    assert deadlines.now - began == pytest.approx(14.9 if lives else 30.0 - age_s)
