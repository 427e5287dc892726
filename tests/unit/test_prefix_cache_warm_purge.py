"""The in-memory warm store purges expired entries by time, wherever they are in its recency
order, before it applies its bound: a live 1-hour prefix touched long ago is not evicted for
the expired 5-minute ones touched after it (the next turn would pay a 2x write, not a 0.1x
read), and an entry refreshed since its first expiry is kept to its new one."""

from __future__ import annotations

from services.common.clock import ManualClock
from services.prefix_cache.warm import READ_GRACE_MS, InMemoryWarmStore, Scope
from tests.unit.test_prefix_cache_rules import make, split, turn

AGENT: Scope = ("agent", "sim-large")


async def test_a_live_1h_prefix_survives_a_trickle_of_expired_5m_ones() -> None:
    store, clock = InMemoryWarmStore(max_entries=20), ManualClock()  # a scaled-down bound
    agent = make([("agent-system", 2000, "1h")])
    assert await turn(store, agent, clock.now_ms(), scope=AGENT) == split(w1=2000)
    held = []
    for i in range(24):  # another tenant's 5m prefix every 30 s: at most 12 held at once
        clock.advance(s=30)
        await turn(store, make([(f"faq-{i}", 2000, "5m")]), clock.now_ms(), scope=(f"t{i}", "m"))
        held.append(len(store))
    assert await turn(store, agent, clock.now_ms(), scope=AGENT) == split(read=2000)
    assert max(held) <= 13  # the expired ones went, though the 1h entry is in front


async def test_entries_expire_by_time_behind_a_live_one_and_the_bound_holds_live_ones() -> None:
    store, clock = InMemoryWarmStore(max_entries=3), ManualClock()
    await turn(store, make([("long", 2000, "1h")]), clock.now_ms())
    for name in ("a", "b"):
        await turn(store, make([(name, 2000, "5m")]), clock.now_ms())
    clock.advance(ms=300_000 + READ_GRACE_MS)  # a and b expired, past the grace
    await turn(store, make([("c", 2000, "5m")]), clock.now_ms())
    assert len(store) == 2  # long and c: nothing evicted for the bound
    await turn(store, make([("d", 2000, "5m")]), clock.now_ms())
    await turn(store, make([("e", 2000, "5m")]), clock.now_ms())
    assert len(store) == 3  # all live: the least recently touched (long) went
    assert await turn(store, make([("long", 2000, "1h")]), clock.now_ms()) == split(w1=2000)


async def test_an_entry_refreshed_since_its_first_expiry_is_kept_to_its_new_one() -> None:
    store, clock = InMemoryWarmStore(max_entries=100), ManualClock()
    hot = make([("hot", 2000, "5m")])
    await turn(store, hot, clock.now_ms())
    clock.advance(s=240)
    assert await turn(store, hot, clock.now_ms()) == split(read=2000)  # refreshed to 9 min
    clock.advance(ms=60_000 + READ_GRACE_MS)  # past the first expiry and its grace
    await turn(store, make([("other", 2000, "5m")]), clock.now_ms())  # a purge passes
    assert await turn(store, hot, clock.now_ms()) == split(read=2000)


async def test_churn_past_the_bound_keeps_the_store_at_its_bound() -> None:
    store, clock = InMemoryWarmStore(max_entries=10), ManualClock()
    for i in range(1000):  # every write evicts one live entry; expiry items left behind
        clock.advance(ms=10)
        await turn(store, make([(f"p{i % 40}", 2000, "1h")]), clock.now_ms())
    assert len(store) == 10
    clock.advance(ms=3_600_000 + READ_GRACE_MS)
    await turn(store, make([("last", 2000, "5m")]), clock.now_ms())
    assert len(store) == 1  # every other one expired and was purged
