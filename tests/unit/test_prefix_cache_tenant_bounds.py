"""The in-memory warm store and commit records are bounded for all tenants together, and the
bound is shared max-min fairly: one tenant's flood of distinct prompts pushes out its own
entries and records, never those of a tenant holding fewer (whose next turn would pay a write
instead of a read, and whose FINAL would find no WARM, or whose replay would be billed again).
"""

from __future__ import annotations

import pytest

from services.common.clock import ManualClock
from services.common.tokens import load_cl100k
from services.prefix_cache.commit_records import MIN_RECORD_TTL_MS, CommitRecords
from services.prefix_cache.core import BadRequest, PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore, Scope
from tests.unit.test_prefix_cache_core import TABLE, ask
from tests.unit.test_prefix_cache_rules import make, split, turn

A: Scope = ("tenant-a", "sim-large")
B: Scope = ("tenant-b", "sim-large")


async def read(store: InMemoryWarmStore, scope: Scope, name: str, now_ms: int) -> int:
    """The tokens a turn on prefix ``name`` (2,000 tokens, 1h) reads; it writes it if cold."""
    return (await turn(store, make([(name, 2000, "1h")]), now_ms, scope=scope)).read_tokens


async def test_a_flood_of_one_tenants_prompts_evicts_its_own_warm_entries_first() -> None:
    store, clock = InMemoryWarmStore(max_entries=20), ManualClock()
    for i in range(5):
        await read(store, B, f"b-system-{i}", clock.now_ms())
    for i in range(200):  # tenant A: 200 distinct prompts, 10x the bound
        clock.advance(ms=10)
        await read(store, A, f"a-{i}", clock.now_ms())
    assert len(store) == 20  # the bound holds
    # B still reads every one of its prefixes; A had the rest of the bound, its latest 15
    assert [await read(store, B, f"b-system-{i}", clock.now_ms()) for i in range(5)] == [2000] * 5
    assert await read(store, A, "a-199", clock.now_ms()) == 2000


async def test_a_tenant_alone_has_the_whole_bound_and_the_one_holding_most_gives_way() -> None:
    store, clock = InMemoryWarmStore(max_entries=10), ManualClock()
    for i in range(10):
        await read(store, A, f"a-{i}", clock.now_ms())
    assert len(store) == 10
    for i in range(8):  # B arrives: A, holding the most, loses its least recently touched
        await read(store, B, f"b-{i}", clock.now_ms())
    assert len(store) == 10  # 5 each: A's 5 most recent, B's 5 most recent
    assert await read(store, A, "a-5", clock.now_ms()) == 2000
    assert await read(store, A, "a-4", clock.now_ms()) == 0
    assert await read(store, B, "b-7", clock.now_ms()) == 2000


def test_a_flood_of_one_tenants_records_evicts_its_own_records_first() -> None:
    records = CommitRecords(ttl_ms=MIN_RECORD_TTL_MS, max_records=20)
    for i in range(5):
        records.put_warm("tenant-b", f"b{i}", "sim-large", "", split(input_=1), 0)
    for i in range(200):
        records.put_warm("tenant-a", f"a{i}", "sim-large", "", split(input_=1), i)
    assert len(records) == 20
    assert all(records.get("tenant-b", f"b{i}", 200) is not None for i in range(5))
    assert records.get("tenant-a", "a199", 200) is not None
    assert records.get("tenant-a", "a184", 200) is None  # A kept its 15 most recent


async def test_after_another_tenants_flood_a_tenants_final_bills_and_its_replay_does_not() -> None:
    clock = ManualClock()
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(load_cl100k()),
        cache=InMemoryWarmStore(max_entries=50),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(MIN_RECORD_TTL_MS, max_records=50), TotalsLedger()),
        clock=clock,
        lookback=20,
    )
    await core.warm("b", "b-done", "sim-large", ask("B's first question?"), "")
    billed = await core.final("b", "b-done", "sim-large", 10, 0, "")
    await core.warm("b", "b-open", "sim-large", ask("B's second question?"), "")
    for i in range(100):  # tenant A: 100 distinct prompts, each answered
        clock.advance(ms=10)
        await core.warm("a", f"a{i}", "sim-large", ask(f"A's question {i}?", f"tool {i}"), "")
        await core.final("a", f"a{i}", "sim-large", 10, 0, "")
    # B's open answer still bills (its WARM commit was kept) ...
    await core.final("b", "b-open", "sim-large", 10, 0, "")
    # ... its replayed answer (the router's outbox sends WARM and FINAL again) is the bill it
    # had, not a second one ...
    await core.warm("b", "b-done", "sim-large", ask("B's first question?"), "")
    assert await core.final("b", "b-done", "sim-large", 10, 0, "") == billed
    assert (await core.totals("b")).requests == 2
    # ... and its next turn reads the system prompt it wrote
    next_turn = await core.warm("b", "b-next", "sim-large", ask("B's third question?"), "")
    assert next_turn.read_tokens > 0


async def test_a_tenant_the_key_file_could_not_hold_is_refused_and_nothing_kept() -> None:
    """prefix-cache warmed, recorded and billed under any non-empty tenant (1 MB, a NUL,
    "../..", a right-to-left override): now the key store's rule, INVALID_ARGUMENT."""
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(load_cl100k()),
        cache=(store := InMemoryWarmStore()),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(MIN_RECORD_TTL_MS), TotalsLedger()),
        clock=ManualClock(),
        lookback=20,
    )
    for tenant in ("../..", "a\x00b", "\u202eevil", "t" * 1_000_000):
        for call in (
            core.plan(tenant, "sim-large", ask("Q?"), []),
            core.warm(tenant, "r1", "sim-large", ask("Q?"), ""),
            core.final(tenant, "r1", "sim-large", 1, 0, ""),
            core.totals(tenant),
        ):
            with pytest.raises(BadRequest, match=r"^tenant must be 1 to 64") as caught:
                await call
            assert len(str(caught.value)) < 300
    assert len(store) == 0
