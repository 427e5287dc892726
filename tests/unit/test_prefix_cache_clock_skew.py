"""Whether a stored prefix was readable at a request's arrival is judged with each
prefix-cache's own wall clock: a replica whose clock is behind another's sharing the Redis
store, or a clock stepped back (NTP), must read an entry whose first-readable time lies in its
own future, not bill a phantom write; where the clocks agree an entry written after a request
arrived (by a request still in flight) is still no read for it. Both backends; time is the
injected ManualClock."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.tokens import load_cl100k
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import CommitLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Probe, Split, Write
from services.prefix_cache.warm import WarmStore
from tests.unit.conftest import LedgerFactory

SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the policy section." for i in range(120))
BASE_MS = 1_700_000_000_000


def _core(clock: ManualClock, store: WarmStore, ledger: CommitLedger) -> PrefixCacheCore:
    return PrefixCacheCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(load_cl100k()),
        cache=store,
        views=ReplicaViews(65536),
        ledger=ledger,
        clock=clock,
        lookback=20,
        plans=PlanMemo(clock, ttl_ms=600_000, max_blocks=1_000_000),
    )


def _ask(question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=SYSTEM, cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=50,
    )


async def _turn(core: PrefixCacheCore, request_id: str, question: str) -> tuple[Split, Split]:
    """A turn's Plan (on arrival) and its WARM (at its first token, same instant here)."""
    plan = await core.plan("t", "sim-large", _ask(question), [])
    warm = await core.warm(
        "t",
        request_id,
        "sim-large",
        None,
        "",
        max_read_tokens=plan.split.read_tokens,
        plan_id=plan.plan_id,
    )
    return plan.split, warm


async def test_a_replica_whose_clock_is_behind_reads_what_one_ahead_wrote(
    warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """Two replicas sharing the store, A's clock 3 s ahead of B's: a turn on B 1 s after A's
    write (B's clock 2 s before the entry's first-readable time) was billed the 1,440-token
    write ($0.005424) instead of the read ($0.000456)."""
    ledger = make_ledger(86_400_000)
    a_clock, b_clock = ManualClock(BASE_MS + 3_000), ManualClock(BASE_MS)
    a = _core(a_clock, warm_store, ledger)
    b = _core(b_clock, warm_store, ledger)
    _, wrote = await _turn(a, "r0", "Rule 1?")
    assert wrote.write_5m_tokens > 1_000
    b_clock.advance(s=1)
    plan, got = await _turn(b, "r1", "Rule 2?")
    assert plan.read_tokens == wrote.write_5m_tokens
    assert (got.read_tokens, got.creation_tokens) == (wrote.write_5m_tokens, 0)


async def test_a_clock_stepped_back_still_reads_what_it_wrote_before_the_step(
    warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """One prefix-cache whose clock steps back 60 s between two turns: the next turn, 10 s
    later by the stepped clock, was billed a write."""
    clock = ManualClock(BASE_MS)
    core = _core(clock, warm_store, make_ledger(86_400_000))
    _, wrote = await _turn(core, "r0", "Rule 1?")
    clock.advance(s=-60)
    clock.advance(s=10)
    plan, got = await _turn(core, "r1", "Rule 2?")
    assert plan.read_tokens == wrote.write_5m_tokens
    assert (got.read_tokens, got.creation_tokens) == (wrote.write_5m_tokens, 0)


async def test_an_entry_written_after_an_arrival_is_no_read_for_it_where_clocks_agree(
    warm_store: WarmStore,
) -> None:
    """The guard kept: an entry created between a request's arrival and the judging clock's
    now (a request in flight wrote it) is skipped; one created after now (a clock behind)
    is read."""
    scope, probe = ("t", "sim-large"), [Probe("d", 2_000)]
    await warm_store.settle(scope, [], [Write("d", 2_000, 300_000)], 10_000, started_ms=9_000)
    # arrived at 9,500, judged at 10,000 (the write's instant) and at 12,000: no read
    assert await warm_store.settle(scope, probe, [], 10_000, 9_500, started_ms=9_500) is None
    assert await warm_store.settle(scope, probe, [], 12_000, 9_500, started_ms=9_500) is None
    # judged by a clock 1 s behind the writer's (its now 9,000 < 10,000): read
    hit = await warm_store.settle(scope, probe, [], 9_000, 8_500, started_ms=8_500)
    assert hit is not None and hit.tokens == 2_000
    looked = await warm_store.longest(scope, probe, 9_000)
    assert looked is not None and looked.tokens == 2_000
