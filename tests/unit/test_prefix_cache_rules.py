"""The accounting rules, hand-computed on blocks built directly (exact token counts).

Each test names the documented rule it checks, and runs against both warm stores (in memory and
a real Redis server: the ``warm_store`` fixture); the rules are those of
https://docs.claude.com/en/docs/build-with-claude/prompt-caching (breakpoints, minimum cacheable
length, 20-block lookback with the breakpoint included, 5m/1h lifetimes refreshed on read, 1h
entries before 5m entries, billing by position) as DESIGN.md asks prefix-cache to apply them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from services.common.clock import ManualClock
from services.common.models import ModelSpec, load_model_table
from services.common.prompt import Block
from services.prefix_cache.rules import (
    RuleViolation,
    Site,
    Split,
    plan_prompt,
    settle,
)
from services.prefix_cache.warm import InMemoryWarmStore, Scope, WarmStore

LARGE = load_model_table().models["sim-large"]
SCOPE: Scope = ("tenant-a", "sim-large")

Part = tuple[str, int, str | None]  # (content id, tokens, breakpoint)


def make(parts: Sequence[Part]) -> list[Block]:
    """Blocks whose digests chain their content ids, as canonical_blocks chains texts."""
    blocks, chain = [], "root"
    for i, (content, tokens, ttl) in enumerate(parts):
        chain = hashlib.sha256(f"{chain}/{content}".encode()).hexdigest()
        blocks.append(Block("messages", i, content, tuple(range(tokens)), ttl, chain))
    return blocks


def sites(blocks: Sequence[Block]) -> list[Site]:
    return [Site(f"request.messages[{i}].content[0]", not b.text) for i, b in enumerate(blocks)]


async def turn(
    store: WarmStore,
    blocks: Sequence[Block],
    now_ms: int,
    *,
    spec: ModelSpec = LARGE,
    scope: Scope = SCOPE,
    lookback: int = 20,
) -> Split:
    """What a WARM commit does: plan, atomically read-refresh-write, settle."""
    plan = plan_prompt(blocks, sites(blocks), spec, lookback)
    hit = await store.settle(scope, plan.probes, plan.writes, now_ms)
    return settle(plan, hit.tokens if hit else 0)


def split(input_: int = 0, w5: int = 0, w1: int = 0, read: int = 0) -> Split:
    return Split(input_tokens=input_, write_5m_tokens=w5, write_1h_tokens=w1, read_tokens=read)


async def test_prefix_below_minimum_cacheable_length_is_neither_written_nor_read(
    warm_store: WarmStore,
) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("sys", 1000, "5m"), ("q", 50, None)])  # 1000 < 1024 minimum
    assert await turn(store, blocks, clock.now_ms()) == split(input_=1050)
    assert await turn(store, blocks, clock.now_ms()) == split(input_=1050)
    assert await store.count() == 0


async def test_short_first_breakpoint_is_skipped_but_a_later_long_one_caches(
    warm_store: WarmStore,
) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("a", 500, "5m"), ("b", 1000, "5m"), ("q", 40, None)])
    assert await turn(store, blocks, clock.now_ms()) == split(input_=40, w5=1500)


async def test_first_turn_writes_the_prefix_up_to_the_last_breakpoint(
    warm_store: WarmStore,
) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("tools", 800, "5m"), ("sys", 1200, "5m"), ("q", 30, None)])
    assert await turn(store, blocks, clock.now_ms()) == split(input_=30, w5=2000)


async def test_second_turn_with_identical_prefix_reads_it(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    first = make([("sys", 2000, "5m"), ("q1", 30, None)])
    second = make([("sys", 2000, "5m"), ("q2", 45, None)])
    await turn(store, first, clock.now_ms())
    clock.advance(s=10)
    assert await turn(store, second, clock.now_ms()) == split(input_=45, read=2000)


async def test_growing_conversation_reads_the_old_prefix_and_writes_only_the_new_part(
    warm_store: WarmStore,
) -> None:
    store, clock = warm_store, ManualClock()
    await turn(store, make([("sys", 2000, "5m"), ("u1", 100, None)]), clock.now_ms())
    grown = make([("sys", 2000, "5m"), ("u1", 100, None), ("a1", 200, None), ("u2", 50, "5m")])
    assert await turn(store, grown, clock.now_ms()) == split(read=2000, w5=350)


def _history(n: int, breakpoint_at: int, first: int = 100) -> list[Block]:
    """``n`` blocks of 100 tokens (the first ``first``), one breakpoint; 0-based positions."""
    return make(
        [
            (f"m{i}", first if i == 0 else 100, "5m" if i == breakpoint_at else None)
            for i in range(n)
        ]
    )


async def test_lookback_checks_20_blocks_counting_the_breakpoint(warm_store: WarmStore) -> None:
    """Anthropic's lookback checks 20 block positions, the breakpoint itself the first: with the
    breakpoint on block 30 (1-based) it checks blocks 30, 29, ..., 11 (check #20)."""
    store, clock = warm_store, ManualClock()
    await turn(store, _history(11, breakpoint_at=10), clock.now_ms())  # entry at block 11
    got = await turn(store, _history(30, breakpoint_at=29), clock.now_ms())  # bp on block 30
    assert got == split(read=1100, w5=1900)


async def test_lookback_misses_an_entry_beyond_the_20_blocks_as_in_the_docs(
    warm_store: WarmStore,
) -> None:
    """The docs' example: 30 blocks, cache_control only on block 30, an earlier request wrote
    block 5: blocks 30..11 are checked, block 5 is beyond the 20-block window, no hit, and
    everything up to block 30 is written."""
    store, clock = warm_store, ManualClock()
    await turn(store, _history(5, breakpoint_at=4, first=1100), clock.now_ms())  # block 5
    got = await turn(store, _history(30, breakpoint_at=29, first=1100), clock.now_ms())
    assert got == split(w5=4000)


async def test_lookback_misses_an_entry_one_block_beyond_the_window(
    warm_store: WarmStore,
) -> None:
    """Block 10 is the 21st position back from block 30: it was read (21 positions checked), a
    0.1x read where the provider bills a 1.25x write of the whole prefix."""
    store, clock = warm_store, ManualClock()
    await turn(store, _history(10, breakpoint_at=9, first=200), clock.now_ms())  # block 10
    got = await turn(store, _history(30, breakpoint_at=29, first=200), clock.now_ms())
    assert got == split(w5=3100)


async def test_lookback_is_configurable_and_one_checks_only_the_breakpoint(
    warm_store: WarmStore,
) -> None:
    store, clock = warm_store, ManualClock()
    await turn(store, _history(11, breakpoint_at=10), clock.now_ms())
    got = await turn(store, _history(12, breakpoint_at=11), clock.now_ms(), lookback=1)
    assert got == split(w5=1200)
    got = await turn(store, _history(13, breakpoint_at=12), clock.now_ms(), lookback=2)
    assert got == split(read=1200, w5=100)


async def test_5m_entry_expires_after_300_seconds_without_reads(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("sys", 2000, "5m"), ("q", 10, None)])
    await turn(store, blocks, clock.now_ms())
    clock.advance(s=300)
    assert await turn(store, blocks, clock.now_ms()) == split(input_=10, w5=2000)


async def test_reading_a_5m_entry_refreshes_its_lifetime(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("sys", 2000, "5m"), ("q", 10, None)])
    await turn(store, blocks, clock.now_ms())
    for _ in range(3):  # 897 s after the write, never 300 s without a read
        clock.advance(s=299)
        assert await turn(store, blocks, clock.now_ms()) == split(input_=10, read=2000)


async def test_a_read_alone_refreshes_the_entry_it_read(warm_store: WarmStore) -> None:
    """Each turn moves the breakpoint to a new last block, so the old entry is never rewritten:
    only the cache hit itself ("Cache Hits & Refreshes") keeps it alive."""
    store, clock = warm_store, ManualClock()
    await turn(store, make([("sys", 2000, "5m")]), clock.now_ms())
    for n in range(3):
        clock.advance(s=299)
        blocks = make([("sys", 2000, None), (f"q{n}", 50, "5m")])
        assert await turn(store, blocks, clock.now_ms()) == split(read=2000, w5=50)


async def test_1h_entry_outlives_5_minutes_and_expires_after_an_hour(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("sys", 2000, "1h"), ("q", 10, None)])
    assert await turn(store, blocks, clock.now_ms()) == split(input_=10, w1=2000)
    clock.advance(s=3599)
    assert await turn(store, blocks, clock.now_ms()) == split(input_=10, read=2000)
    clock.advance(s=3600)  # an hour after that read
    assert await turn(store, blocks, clock.now_ms()) == split(input_=10, w1=2000)


async def test_mixed_1h_and_5m_writes_are_billed_by_position(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("tools", 1100, "1h"), ("sys", 500, "5m"), ("q", 300, None)])
    assert await turn(store, blocks, clock.now_ms()) == split(input_=300, w1=1100, w5=500)
    clock.advance(s=600)  # the 5m entry expired, the 1h one is warm: read, then 5m write
    assert await turn(store, blocks, clock.now_ms()) == split(input_=300, read=1100, w5=500)
    assert await turn(store, blocks, clock.now_ms()) == split(input_=300, read=1600)


def test_more_than_4_breakpoints_is_rejected_naming_the_fields() -> None:
    blocks = make([(f"b{i}", 300, "5m") for i in range(5)])
    with pytest.raises(RuleViolation, match=r"5 blocks carry cache_control.*at most 4"):
        plan_prompt(blocks, sites(blocks), LARGE, 20)


def test_breakpoint_on_an_empty_block_is_rejected() -> None:
    blocks = make([("sys", 2000, None), ("", 0, "5m")])
    with pytest.raises(RuleViolation, match=r"messages\[1\].*empty block cannot be cached"):
        plan_prompt(blocks, sites(blocks), LARGE, 20)


def test_1h_breakpoint_after_a_5m_one_is_rejected() -> None:
    blocks = make([("a", 1100, "5m"), ("b", 100, "1h")])
    with pytest.raises(RuleViolation, match=r"1-hour entries must come before 5-minute"):
        plan_prompt(blocks, sites(blocks), LARGE, 20)


def test_1h_entries_before_5m_entries_and_exactly_4_breakpoints_are_accepted() -> None:
    blocks = make([("a", 1100, "1h"), ("b", 10, "1h"), ("c", 10, "5m"), ("d", 10, "5m")])
    plan = plan_prompt(blocks, sites(blocks), LARGE, 20)
    assert [w.ttl_ms for w in plan.writes] == [3_600_000, 3_600_000, 300_000, 300_000]
    assert plan.cached_end == plan.prompt_tokens == 1130


async def test_caches_are_isolated_per_tenant(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    blocks = make([("sys", 2000, "5m"), ("q", 10, None)])
    await turn(store, blocks, clock.now_ms(), scope=("tenant-a", "sim-large"))
    got = await turn(store, blocks, clock.now_ms(), scope=("tenant-b", "sim-large"))
    assert got == split(input_=10, w5=2000)


async def test_caches_are_isolated_per_model(warm_store: WarmStore) -> None:
    store, clock = warm_store, ManualClock()
    small = load_model_table().models["sim-small"]
    blocks = make([("sys", 2000, "5m"), ("q", 10, None)])
    await turn(store, blocks, clock.now_ms(), scope=("tenant-a", "sim-large"))
    got = await turn(store, blocks, clock.now_ms(), spec=small, scope=("tenant-a", "sim-small"))
    assert got == split(input_=10, w5=2000)


async def test_warm_store_is_bounded_and_longest_has_no_side_effects() -> None:
    store, clock = InMemoryWarmStore(max_entries=2), ManualClock()
    for name in ("a", "b", "c"):
        await turn(store, make([(name, 2000, "5m")]), clock.now_ms())
    assert len(store) == 2
    plan = plan_prompt(make([("c", 2000, "5m")]), sites(make([("c", 2000, "5m")])), LARGE, 20)
    hit = await store.longest(SCOPE, plan.probes, clock.now_ms())
    assert hit is not None and hit.expires_at_ms == clock.now_ms() + 300_000
    clock.advance(s=200)
    again = await store.longest(SCOPE, plan.probes, clock.now_ms())
    assert again == hit  # not refreshed by looking
