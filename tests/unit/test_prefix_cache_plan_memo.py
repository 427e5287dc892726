"""A Plan's prompt reused by its WARM commit: computed once, owned by one tenant and model."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from dataclasses import dataclass
from typing import ClassVar

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import ModelSpec, load_model_table
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.commit_records import CommitRecord, CommitRecords
from services.prefix_cache.core import (
    INLINE_PROMPT_BYTES,
    INLINE_PROMPT_PARTS,
    PlanGone,
    PrefixCacheCore,
    Prompt,
    TokenizerSlot,
)
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore

SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the policy section." for i in range(120))


@dataclass(frozen=True)
class Weighted:
    weight: int


def test_a_plan_is_taken_once_by_its_own_tenant_and_model() -> None:
    memo: PlanMemo[Weighted] = PlanMemo(ManualClock(), ttl_ms=1000, max_blocks=100)
    plan_id = memo.put("a", "m", Weighted(3))
    assert plan_id and memo.blocks == 3
    assert memo.take(plan_id, "b", "m") is None  # another tenant
    assert memo.take(plan_id, "a", "other") is None  # another model
    assert memo.take(plan_id, "a", "m") == Weighted(3)
    assert memo.take(plan_id, "a", "m") is None  # once
    assert len(memo) == 0 and memo.blocks == 0


def test_plans_expire_by_the_clock() -> None:
    clock = ManualClock()
    memo: PlanMemo[Weighted] = PlanMemo(clock, ttl_ms=1000, max_blocks=100)
    old = memo.put("a", "m", Weighted(1))
    clock.advance(ms=1000)
    assert memo.take(old, "a", "m") is None
    kept = memo.put("a", "m", Weighted(1))
    clock.advance(ms=999)
    assert memo.take(kept, "a", "m") == Weighted(1)


def test_the_oldest_plans_go_first_past_the_block_budget() -> None:
    memo: PlanMemo[Weighted] = PlanMemo(ManualClock(), ttl_ms=1000, max_blocks=10)
    first = memo.put("a", "m", Weighted(6))
    second = memo.put("a", "m", Weighted(4))
    third = memo.put("a", "m", Weighted(5))  # 15 > 10: the first goes
    assert memo.blocks == 9
    assert memo.take(first, "a", "m") is None
    assert memo.take(second, "a", "m") == Weighted(4)
    assert memo.take(third, "a", "m") == Weighted(5)
    assert memo.put("a", "m", Weighted(11)) == ""  # larger than the whole budget: not kept


def test_a_flood_of_one_tenants_plans_pushes_out_its_own_first() -> None:
    """The budget is for all tenants together, shared fairly by weight: tenant a's 1,000 Plans
    whose WARM never comes push out a's own plans, not b's (whose WARM would have to send its
    request again); a tenant alone has the whole budget."""
    memo: PlanMemo[Weighted] = PlanMemo(ManualClock(), ttl_ms=60_000, max_blocks=100)
    mine = [memo.put("b", "m", Weighted(5)) for _ in range(4)]
    flood = [memo.put("a", "m", Weighted(5)) for _ in range(1000)]
    assert memo.blocks == 100
    assert [memo.take(plan_id, "b", "m") for plan_id in mine] == [Weighted(5)] * 4
    assert memo.take(flood[-1], "a", "m") == Weighted(5) and memo.take(flood[0], "a", "m") is None
    alone: PlanMemo[Weighted] = PlanMemo(ManualClock(), ttl_ms=60_000, max_blocks=100)
    kept = [alone.put("a", "m", Weighted(5)) for _ in range(20)]
    assert alone.blocks == 100 and all(alone.take(p, "a", "m") for p in kept)


def test_a_zero_ttl_keeps_nothing() -> None:
    memo: PlanMemo[Weighted] = PlanMemo(ManualClock(), ttl_ms=0, max_blocks=10)
    assert memo.put("a", "m", Weighted(1)) == ""
    assert len(memo) == 0


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


class CountingCore(PrefixCacheCore):
    computed = 0
    threads: ClassVar[list[int]] = []

    def _compute(
        self, tenant: str, request: pb.CompleteRequest, spec: ModelSpec, tokenizer: Tokenizer
    ) -> Prompt:
        type(self).computed += 1
        type(self).threads.append(threading.get_ident())
        return super()._compute(tenant, request, spec, tokenizer)


def _core(tokenizer: Tokenizer, clock: ManualClock) -> CountingCore:
    CountingCore.computed = 0
    CountingCore.threads = []
    return CountingCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(tokenizer),
        cache=InMemoryWarmStore(1000),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(3_600_000, 1000), TotalsLedger()),
        clock=clock,
        lookback=20,
        plans=PlanMemo(clock, ttl_ms=60_000, max_blocks=100_000),
    )


def _request() -> pb.CompleteRequest:
    system = pb.ContentBlock(text=SYSTEM, cache_control=pb.CacheControl())
    return pb.CompleteRequest(
        model="sim-large",
        max_tokens=100,
        system=[system],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello?")])],
    )


async def test_warm_by_plan_id_computes_the_prompt_once_and_bills_the_same(
    tokenizer: Tokenizer,
) -> None:
    clock = ManualClock()
    by_plan = _core(tokenizer, clock)
    plan = await by_plan.plan("t", "sim-large", _request(), ["r1"])
    assert plan.plan_id
    split = await by_plan.warm("t", "req-1", "sim-large", None, "r1", 0, None, plan.plan_id)
    assert CountingCore.computed == 1  # Plan computed it; WARM reused it

    by_request = _core(tokenizer, clock)
    expected = await by_request.warm("t", "req-1", "sim-large", _request(), "r1", 0, None)
    assert split == expected
    assert split.creation_tokens > 1024


async def test_a_gone_plan_without_the_request_is_refused_and_changes_nothing(
    tokenizer: Tokenizer,
) -> None:
    clock = ManualClock()
    core = _core(tokenizer, clock)
    plan = await core.plan("t", "sim-large", _request(), ["r1"])
    clock.advance(ms=60_000)
    with pytest.raises(PlanGone, match="send the request"):
        await core.warm("t", "req-1", "sim-large", None, "r1", 0, None, plan.plan_id)
    with pytest.raises(PlanGone):  # another tenant cannot use it either
        await core.warm("u", "req-2", "sim-large", None, "r1", 0, None, "nonexistent")
    # with the request it goes through, as if there had been no plan
    split = await core.warm("t", "req-1", "sim-large", _request(), "r1", 0, None, plan.plan_id)
    assert split.creation_tokens > 1024


class CountingLedger(InMemoryLedger):
    reads = 0

    async def get(self, tenant: str, request_id: str, now_ms: int) -> CommitRecord | None:
        self.reads += 1
        return await super().get(tenant, request_id, now_ms)


async def test_a_warm_reads_the_ledger_once_and_its_retry_gets_the_same_split(
    tokenizer: Tokenizer,
) -> None:
    clock = ManualClock()
    ledger = CountingLedger(CommitRecords(3_600_000, 1000), TotalsLedger())
    core = PrefixCacheCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(tokenizer),
        cache=InMemoryWarmStore(1000),
        views=ReplicaViews(65536),
        ledger=ledger,
        clock=clock,
        lookback=20,
        plans=PlanMemo(clock, ttl_ms=60_000, max_blocks=100_000),
    )
    plan = await core.plan("t", "sim-large", _request(), ["r1"])
    split = await core.warm("t", "req-1", "sim-large", None, "r1", 0, None, plan.plan_id)
    assert ledger.reads == 1  # one Redis trip before the write, not two
    # the plan is taken; a retry still gets the committed split, not PlanGone
    again = await core.warm("t", "req-1", "sim-large", None, "r1", 0, None, plan.plan_id)
    assert again == split
    assert ledger.reads == 2


async def test_a_small_prompt_is_computed_on_the_loop_and_a_large_one_in_a_worker(
    tokenizer: Tokenizer,
) -> None:
    core = _core(tokenizer, ManualClock())
    small = _request()
    large = pb.CompleteRequest()
    large.CopyFrom(small)
    large.system[0].text = SYSTEM * 8
    assert small.ByteSize() <= INLINE_PROMPT_BYTES < large.ByteSize()
    await core.plan("t", "sim-large", small, ["r1"])
    await core.plan("t", "sim-large", large, ["r1"])
    loop_thread = threading.get_ident()
    assert CountingCore.threads[0] == loop_thread  # no handoff for ~1 ms of work
    assert CountingCore.threads[1] != loop_thread  # a long one never stalls the loop


async def test_a_small_request_of_many_tiny_blocks_is_computed_in_a_worker(
    tokenizer: Tokenizer,
) -> None:
    """Its cost is per block (~4 us each), not per byte: 6,400 one-letter blocks fit in 32 kB
    and would hold the loop ~26 ms; 1,024 of them (~4 ms) are enough to leave it."""
    core = _core(tokenizer, ManualClock())
    many = _request()
    for _ in range(INLINE_PROMPT_PARTS * 4):
        many.messages[-1].content.add().text = "a"
    assert many.ByteSize() <= INLINE_PROMPT_BYTES
    await core.plan("t", "sim-large", many, ["r1"])
    assert CountingCore.threads[0] != threading.get_ident()


def _asked(text: str, cached: bool) -> pb.CompleteRequest:
    control = pb.CacheControl() if cached else None
    blocks = [pb.ContentBlock(text=part, cache_control=control) for part in (text, "Why?")]
    return pb.CompleteRequest(
        model="sim-large", max_tokens=50, messages=[pb.Message(role=pb.ROLE_USER, content=blocks)]
    )


@pytest.mark.parametrize(
    ("text", "cached", "n"),
    [
        ("Opening hours on day {i}?", False, 300),  # short: no KV block, no probe
        ("{i} " + " ".join(f"word{j}" for j in range(2000)), False, 60),  # blocks, no probe
        ("{i} " + " ".join(f"word{j}" for j in range(2000)), True, 60),  # probes, writes
    ],
    ids=["short", "long", "long_with_breakpoints"],
)
async def test_the_memos_budget_bounds_its_memory_at_the_documented_bytes_a_block(
    tokenizer: Tokenizer, text: str, cached: bool, n: int
) -> None:
    """README: PREFIX_CACHE_PLAN_MEMO_BLOCKS at about 80 bytes each at most. Plans whose WARM
    never comes (a flood of short unique prompts) must not hold ~1.3 kB a block charged.
    300 short plans (12 blocks charged each: 3,600) but 60 long ones (325-337 each: ~20,000, 4.3 s
    -> 0.7 s alone): 300 long ones measured 74.3 bytes a block against 73.3 for 60, and 24
    bytes more a block held by each plan fails every case."""
    clock = ManualClock()
    memo: PlanMemo[Prompt] = PlanMemo(clock, ttl_ms=60_000, max_blocks=10**9)  # to weigh
    core = PrefixCacheCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(tokenizer),
        cache=InMemoryWarmStore(1000),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(3_600_000, 1000), TotalsLedger()),
        clock=clock,
        lookback=20,
        plans=memo,
    )
    requests = [_asked(text.format(i=i), cached) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        for request in requests:
            await core.plan("t", "sim-large", request, ["r1"])
        charged = memo.blocks
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        clock.advance(ms=60_000)  # every plan expires; the next put collects them
        await core.plan("t", "sim-large", requests[0], ["r1"])
        gc.collect()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(memo) == 1
    assert freed / charged <= 80, f"{freed / n:.0f} bytes a plan, {charged / n:.0f} blocks charged"
