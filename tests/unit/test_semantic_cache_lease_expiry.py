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
from services.semantic_cache import cache as cache_module
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import END_TURN, Answer
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
        assert (await cache.check(question("leader"))).leader  # the retry leads again
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
