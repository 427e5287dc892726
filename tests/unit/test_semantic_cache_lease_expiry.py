"""A lookup waiting on a lease whose holder died waits until the lease's age limit, not its
whole budget: then the lease ends and this lookup leads the model call.

A ``ManualClock``; the lease wait is a fake that records its budget and moves the clock by
what it waited (it times out), so nothing is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from services.common.clock import ManualClock
from services.common.env import Env
from services.semantic_cache import cache as cache_module
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import END_TURN, Answer
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.verifier import Verifier, VerifierWeights
from services.semantic_cache.wiring import build_cache
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

Meanwhile = Callable[[], Awaitable[bool]]  # what happens during a wait: True = lease ended


def question(request_id: str) -> Query:
    request = make_request("Reset my password")
    request.request_id = request_id
    return query_from_request("a", request)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cache(clock: ManualClock) -> SemanticCache:
    return SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))


@pytest.fixture
def waits(
    monkeypatch: pytest.MonkeyPatch, clock: ManualClock
) -> tuple[list[float], list[Meanwhile]]:
    """(each lease wait's budget, what happens during each wait); a wait with nothing
    scripted times out, its budget gone."""
    budgets: list[float] = []
    script: list[Meanwhile] = []

    async def scripted(event: asyncio.Event, budget_s: float) -> bool:
        budgets.append(budget_s)
        if script and await script.pop(0)():
            return True
        clock.advance(s=budget_s)
        return False

    monkeypatch.setattr(cache_module, "wait", scripted)
    return budgets, script


async def test_a_waiter_on_a_dead_leaders_lease_leads_once_the_lease_expires(
    cache: SemanticCache, clock: ManualClock, waits: tuple[list[float], list[Meanwhile]]
) -> None:
    budgets, _ = waits
    assert (await cache.check(question("leader"))).leader  # ... its router dies: no Store
    clock.advance(s=29)
    waiter = await cache.check(question("waiter"), wait_s=6.0)
    assert budgets == [1.0]  # the lease's last second, not the whole 6 s
    assert waiter.leader and waiter.lease_id and not waiter.pending


async def test_a_lease_taken_over_by_its_retried_request_is_waited_for_within_the_budget(
    cache: SemanticCache, clock: ManualClock, waits: tuple[list[float], list[Meanwhile]]
) -> None:
    """The dead leader's client retried the request: the retry takes the lease over (a new age
    limit) and its Store serves the waiter."""
    budgets, script = waits
    assert (await cache.check(question("leader"))).leader
    clock.advance(s=29)

    async def retried() -> bool:
        clock.advance(s=0.5)
        assert (await cache.check(question("leader"), retry=True)).leader  # the retry leads
        clock.advance(s=0.5)
        return False  # the old age limit passes

    async def stored() -> bool:
        answer = Answer(
            payload=b"use the link", stop_reason=END_TURN, output_tokens=3, has_tool_use=False
        )
        assert (await cache.store(question("leader"), answer)).stored
        return True

    script.extend([retried, stored])
    waiter = await cache.check(question("waiter"), wait_s=6.0)
    assert budgets == [1.0, 5.0]  # then the rest of the budget on the taken-over lease
    assert waiter.hit and waiter.waited and not waiter.leader


async def test_a_waiter_whose_budget_ends_first_gets_pending(
    cache: SemanticCache, waits: tuple[list[float], list[Meanwhile]]
) -> None:
    budgets, _ = waits
    assert (await cache.check(question("leader"))).leader
    waiter = await cache.check(question("waiter"), wait_s=6.0)
    assert budgets == [6.0]
    assert waiter.pending and not waiter.leader


def test_a_leases_life_is_what_its_age_limit_leaves(clock: ManualClock) -> None:
    leases = Leases(clock, 30.0)
    key = ("a", "scope", "reset my password")
    assert leases.life_s(key) == 0.0
    leases.take(key, "r1")
    clock.advance(s=12.5)
    assert leases.life_s(key) == 17.5


def wired(wall: ManualClock, lease_clock: ManualClock | None = None) -> SemanticCache:
    """The cache as the service builds it (defaults: leases of 30 s), with a verifier that
    needs no model (these lookups find nothing to verify); ``lease_clock`` None: the
    service's own."""
    config = SemanticCacheSettings.from_env(Env({}), OperatingPoint.load())
    weights = VerifierWeights(
        ("cosine", "word_jaccard"), (), (0.0, 0.0), (1.0, 1.0), (0.0, 0.0), 5.0, {}
    )
    verifier = Verifier(weights, 0.5)
    if lease_clock is None:
        return build_cache(config, FakeEmbedder(), wall, verifier=verifier)
    return build_cache(config, FakeEmbedder(), wall, verifier=verifier, lease_clock=lease_clock)


async def test_leases_age_on_their_own_clock_whatever_the_wall_clock_does() -> None:
    """A lease lives in this process only. Aged on the wall clock, a step back of an hour
    (NTP) kept a dead holder's lease for the hour and its 30 s, every identical lookup waiting
    on it; a step forward of 31 s ended a live holder's lease mid-call."""
    wall, steady = ManualClock(), ManualClock(0)
    cache = wired(wall, steady)
    assert (await cache.check(question("dead"))).leader  # its router dies: no Store, no Release
    wall.advance(ms=-3_600_000)
    steady.advance(s=29.999)
    assert cache.lease_pending(question("twin"))
    steady.advance(s=0.001)
    assert (await cache.check(question("next"))).leader  # the dead one's ended at 30 s
    wall.advance(s=31)
    assert cache.lease_pending(question("twin"))  # "next"'s call goes on, and its lease


async def test_the_services_leases_are_not_aged_on_the_wall_clock() -> None:
    wall = ManualClock()
    cache = wired(wall)  # the lease clock the service gets (a monotonic one)
    assert (await cache.check(question("live"))).leader
    wall.advance(s=31)
    assert cache.lease_pending(question("twin"))


def test_a_renewal_restarts_the_age_limit_of_the_live_lease_it_names(clock: ManualClock) -> None:
    """The holder of a long model call renews its lease: held past 30 s from its take, and a
    holder that stops renewing (it died) frees the key 30 s after its last renewal."""
    leases = Leases(clock, 30.0)
    key = ("a", "scope", "reset my password")
    lease_id = leases.take(key, "r1")
    clock.advance(s=20)
    assert not leases.renew("a", "another lease")  # only the lease it names
    assert leases.renew("a", lease_id)
    assert leases.life_s(key) == 30.0
    clock.advance(s=25)  # 45 s from its take
    assert leases.held(key) is not None
    assert leases.renew("a", lease_id)
    clock.advance(s=29.999)  # the holder died after that renewal
    assert leases.held(key) is not None
    clock.advance(s=0.001)
    assert leases.held(key) is None
    assert not leases.renew("a", lease_id)  # ended: a late renewal does not bring it back


def test_a_late_renewal_does_not_revive_an_expired_lease_nor_outlive_the_next(
    clock: ManualClock,
) -> None:
    """Past its age limit a lease is over even if nobody looked (its waiters may have been
    woken); the next request's lease is not the old holder's to renew."""
    leases = Leases(clock, 30.0)
    key = ("a", "scope", "reset my password")
    old = leases.take(key, "r1")
    clock.advance(s=30)
    assert not leases.renew("a", old)
    assert leases.held(key) is None
    new = leases.take(key, "r2")
    assert not leases.renew("a", old)
    assert leases.renew("a", new)
    assert leases.end(key, new) and not leases.renew("a", new)  # stored or released: over


def test_a_renewal_names_its_lease_by_id_and_another_tenants_id_renews_nothing(
    clock: ManualClock,
) -> None:
    """A renewal carries no request (its prompt may be a megabyte, sent every third of the
    lease): the lease is found by its id, within the renewing tenant only, and the ids kept
    for that follow the leases (take, take-over, end, expiry), so they are bounded alike."""
    leases = Leases(clock, 30.0)
    key = ("a", "scope", "reset my password")
    lease_id = leases.take(key, "r1")
    clock.advance(s=20)
    assert not leases.renew("b", lease_id)  # another tenant's router, given a's lease_id
    assert leases.life_s(key) == 10.0  # not renewed
    assert leases.renew("a", lease_id) and leases.life_s(key) == 30.0
    retried = leases.take_over(key, "r1")  # a retry of it: the same lease, under a new id
    assert retried and retried != lease_id and not leases.renew("a", lease_id)
    assert leases.renew("a", retried)
    assert leases.end(key, retried) and not leases.renew("a", retried)
    others = [leases.take(("a", "scope", f"question {n}"), f"q{n}") for n in range(100)]
    clock.advance(s=30)  # none renewed: all past their age limit
    last = leases.take(("a", "scope", "the last"), "r2")  # ends the expired on its way
    assert not any(leases.renew("a", other) for other in others)
    assert leases.renew("a", last)
    assert len(leases) == 1 and leases._ids == {last: ("a", "scope", "the last")}


def test_renewed_leases_keep_the_age_order_that_frees_dead_holders(clock: ManualClock) -> None:
    """A take ends the expired leases oldest first: a renewed lease is the youngest, so a
    dead holder's lease taken after it is still ended at its own age limit."""
    leases = Leases(clock, 30.0)
    live, dead = ("a", "s", "live"), ("a", "s", "dead")
    live_id = leases.take(live, "r1")
    clock.advance(s=10)
    leases.take(dead, "r2")  # its router dies
    clock.advance(s=15)
    assert leases.renew("a", live_id)  # until 55 s; dead's ends at 40 s
    clock.advance(s=16)  # 41 s
    leases.take(("a", "s", "third"), "r3")  # ends what has expired on its way
    assert len(leases) == 2 and leases.life_s(dead) == 0.0 and leases.life_s(live) == 14.0


async def test_a_waiter_keeps_waiting_while_the_leader_renews_its_lease(
    monkeypatch: pytest.MonkeyPatch, clock: ManualClock
) -> None:
    """The leader's model call takes 70 s, longer than the 30 s lease, which it renews every
    10 s: the identical request waits (within its own budget) through every renewal and is
    served the stored answer, instead of leading a second model call at 30 s."""
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    leader = await cache.check(question("leader"))
    assert leader.leader
    renewals: list[bool] = []

    async def the_leaders_call_goes_on() -> None:
        """A second of the leader's call: it renews every 10 s and stores at 70 s."""
        clock.advance(s=1)
        elapsed = clock.now_ms() - started_ms
        if elapsed % 10_000 == 0:
            renewals.append(cache.renew("a", leader.lease_id))
        if elapsed == 70_000:
            answer = Answer(
                payload=b"ask at the desk", stop_reason=END_TURN, output_tokens=4,
                has_tool_use=False,
            )  # fmt: skip
            assert (await cache.store(question("leader"), answer)).stored

    budgets: list[float] = []

    async def ticking(event: asyncio.Event, budget_s: float) -> bool:
        budgets.append(budget_s)
        for _ in range(round(budget_s)):
            await the_leaders_call_goes_on()
            if event.is_set():
                return True
        return False

    monkeypatch.setattr(cache_module, "wait", ticking)
    started_ms = clock.now_ms()
    waiter = await cache.check(question("waiter"), wait_s=100.0)
    assert waiter.hit and waiter.waited and not waiter.leader
    assert renewals == [True] * 7
    assert budgets[0] == 30.0 and len(budgets) > 1  # waited on past the first age limit


async def test_a_take_over_renames_the_lease_so_the_first_calls_late_release_ends_nothing(
    cache: SemanticCache, clock: ManualClock, waits: tuple[list[float], list[Meanwhile]]
) -> None:
    """The leader's router lost its client mid-call; the client's retry (same request_id) takes
    the lease over. The first call, cancelled, then sends its Release (or a renewal already on
    its way) naming its own lease_id: that must not end (nor renew) the lease the retry now
    holds, or a waiter wakes without an answer and leads a second paid model call."""
    _, script = waits
    first = await cache.check(question("leader"))
    assert first.leader
    clock.advance(s=5)
    retry = await cache.check(question("leader"), retry=True)
    assert retry.leader and retry.lease_id and retry.lease_id != first.lease_id
    assert not cache.renew("a", first.lease_id)  # the first call's renewal renews nothing
    assert cache.renew("a", retry.lease_id)  # the retry's keeper holds its lease on

    async def the_first_calls_late_release_then_the_retrys_store() -> bool:
        if cache.release(question("leader"), first.lease_id):
            return True  # the lease ended: the waiter wakes without an answer
        answer = Answer(
            payload=b"use the link", stop_reason=END_TURN, output_tokens=3, has_tool_use=False
        )
        assert (await cache.store(question("leader"), answer)).stored
        return True

    script.append(the_first_calls_late_release_then_the_retrys_store)
    waiter = await cache.check(question("waiter"), wait_s=6.0)
    assert waiter.hit and waiter.waited and not waiter.leader  # one model call, not two
