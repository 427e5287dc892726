"""An answer served while prefix-cache is down counts against its tenant's budgets at the
router's estimate (base prices, no cache discount claimed); the billing outbox replays its bill
once prefix-cache is back, and prefix-cache's price is what the tenant is billed. The budgets
must end at that bill, in the period the answer was counted in, once however often the bill is
replayed. Real parts: prefix-cache's core (in memory), the pipeline, the outbox's journal on
disk, the limiter on both stores (in memory and a real Redis, tests/unit/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar, cast

import pytest
from redis.asyncio import Redis

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.core import PrefixCacheCore
from services.router.dependencies import CallFailed
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import LimitPolicy, Periods, UniformPolicies
from services.router.limit_store import LimitStore
from services.router.limit_tickets import Ticket
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import JOURNAL_NAME, Counted, Journal
from services.router.pipeline import Pipeline
from services.router.redis_limits import RedisLimitStore
from services.router.servicer import GatewayServicer
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY, FakeContext
from tests.unit.test_router_outbox_replay import TENANT, Engine, _ask, _core
from tests.unit.test_router_pipeline import FakeStream, Rig

# 2023-11-14 23:59:00 UTC: a minute before the day ends
BEFORE_MIDNIGHT_MS = 1_700_006_340_000
# 2023-11-30 23:59:59.900 UTC: a tenth of a second before the day and the month end
BEFORE_MONTH_END_MS = 1_701_388_799_900
POLICY = LimitPolicy(day_budget_nanos=10**15, month_budget_nanos=10**15)
# the limits store's wait: the service's 0.5 s fails open (admits unreserved) under load
PATIENT_S = 10.0
T = TypeVar("T")


@pytest.fixture
def store(redis_client: Redis | None) -> LimitStore:
    if redis_client is None:
        return MemoryLimitStore()
    return RedisLimitStore(redis_client, server_time=False)  # the tests' clock, injected


async def _spent(store: LimitStore, period: str) -> int:
    """The tenant's spend the store counts in ``period`` (a day or a month)."""
    if isinstance(store, MemoryLimitStore):
        return store._spent.get((TENANT, period), 0)
    assert isinstance(store, RedisLimitStore)
    raw = await store._client.get(f"cachemesh:limits:{{{TENANT}}}:spent:{period}")
    return int(raw or 0)


class DownPort:
    """prefix-cache's API as the router's port, unreachable while ``down``."""

    def __init__(self, api: PrefixCacheApi) -> None:
        self.api, self.down = api, True

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        if self.down:
            raise CallFailed(Code.UNAVAILABLE, "prefix-cache down")
        return await self.api.plan(request)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if self.down:
            raise CallFailed(Code.UNAVAILABLE, "prefix-cache down")
        try:
            return await self.api.commit(request)
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message) from exc


def _outbox(
    port: DownPort, journal: Journal, limiter: Limiter, clock: ManualClock
) -> BillingOutbox:
    """The outbox as the router wires it (services/router/app.py)."""
    return BillingOutbox(
        port,
        journal,
        1.0,
        0.01,
        open_call_billed=lambda bill: limiter.count_unticketed(
            bill.tenant, bill.cost_nanos, started_ms=bill.started_ms
        ),
        estimate_billed=limiter.reconcile,
        wall=clock,
        estimate_kept=limiter.count_estimate,
    )


@dataclass
class Outage:
    """prefix-cache's core behind a port (down until told), the limiter on a store, and the
    router's pipeline (``rig``) with the outbox on a journal, as the router wires them."""

    clock: ManualClock
    core: PrefixCacheCore
    port: DownPort
    limiter: Limiter
    outbox: BillingOutbox
    rig: Rig
    before: int  # the tenant's billed total before the test's answers

    async def admitted(self, request_id: str) -> tuple[pb.CompleteRequest, Ticket]:
        """The follow-up question (its system prompt warm at prefix-cache), admitted."""
        request = _ask("And rule 2?", request_id)
        ticket = await self.limiter.admit(TENANT, request)
        assert isinstance(ticket, Ticket)
        return request, ticket

    async def billed(self) -> int:
        """What prefix-cache billed the tenant since the set-up."""
        return (await self.core.totals(TENANT)).cost_nanos - self.before

    def gateway(self, pipeline: Pipeline) -> GatewayServicer:
        """The Gateway on ``pipeline`` (the rig's), sim-large deployed, with this limiter and
        an answer-once table on this clock."""
        answers = IdempotencyTable(self.clock, 60, 100)
        return gateway_servicer(
            pipeline, {KEY: TENANT}, deployed=["sim-large"], answers=answers, limiter=self.limiter
        )


async def _outage(
    store: LimitStore, journal: Journal, at_ms: int, *, earlier_turn: bool = True
) -> Outage:
    """``earlier_turn``: the tenant's first turn billed before (its system prompt warm, so
    the follow-up's bill is a cache read below the estimate)."""
    clock = ManualClock(at_ms)
    core, _ = _core(clock)
    if earlier_turn:
        await core.warm(TENANT, "earlier", "sim-large", _ask("Rule 1?", "earlier"), "")
        await core.final(TENANT, "earlier", "sim-large", 3, 0, "")
    before = (await core.totals(TENANT)).cost_nanos
    port = DownPort(PrefixCacheApi(core))
    limiter = Limiter(store, UniformPolicies(POLICY), clock, lambda request: 0, timeout_s=PATIENT_S)
    outbox = _outbox(port, journal, limiter, clock)
    prompt = (await core.plan(TENANT, "sim-large", _ask("And rule 2?", ""), [])).split
    rig = Rig(prefix=port, outbox=outbox, models=Engine(prompt.prompt_tokens), wall=clock)  # type: ignore[arg-type]
    return Outage(clock, core, port, limiter, outbox, rig, before)


async def test_a_replayed_bill_corrects_the_estimate_counted_in_its_own_day(
    tmp_path: Path, store: LimitStore
) -> None:
    """An answer at 23:59 UTC with prefix-cache down counts its estimate against today's and
    this month's budgets; its bill is replayed after midnight, prefix-cache pricing the system
    prompt as the cache read it was (the estimate claimed none). Before, the estimate stayed
    counted for the rest of the month (the tenant paid the bill but its budget was charged
    the estimate). Now yesterday's and this month's spend are the bill, and today's is
    untouched (not the correction's, which would go below zero)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS)
    request, ticket = await outage.admitted("r-next")
    end = (await outage.rig.run(request))[-1].end
    outage.limiter.settle(ticket, end)  # as the servicer does when the answer ends
    await outage.limiter.drain()
    estimate = end.cost.cost_nanos
    assert end.cost.estimated and outage.outbox.pending == 1
    counted = Periods.at(outage.clock.now_ms())

    outage.clock.advance(s=120)  # past midnight: prefix-cache is back
    replayed = Periods.at(outage.clock.now_ms())
    assert replayed.day != counted.day and replayed.month == counted.month
    outage.port.down = False
    assert await outage.outbox.flush() == 1
    await outage.limiter.drain()
    billed = await outage.billed()
    assert 0 < billed < estimate  # the system prompt billed as a read
    month = await _spent(store, counted.month)
    assert month == billed, f"estimate {estimate} counted, {billed} billed: spend {month}"
    assert await _spent(store, replayed.day) == 0  # the correction is not today's
    if isinstance(store, RedisLimitStore):  # (the in-memory store keeps only today's)
        assert await _spent(store, counted.day) == billed


async def test_a_replay_after_restarts_corrects_the_budgets_once(
    tmp_path: Path, store: LimitStore
) -> None:
    """The router is restarted while prefix-cache is down: the entry's estimate and its time
    come back from the journal, and the replay corrects the budgets. Then the host crashes
    before the entry's "done" line reached the disk (it is not fsynced: a replay bills once),
    and the next start, 10 min later (past any settle's marker), bills the entry again: a
    no-op at prefix-cache, its FINAL first-wins, whose reply says it is ``repeated``, so the
    correction is not made again (the limits' store keeps nothing to tell it was)."""
    if isinstance(store, MemoryLimitStore):
        pytest.skip("counts in memory start from none at a restart: the next test's case")
    journal = Journal(tmp_path / "data")
    outage = await _outage(store, journal, BEFORE_MIDNIGHT_MS - 3_600_000)
    request, ticket = await outage.admitted("r-next")
    end = (await outage.rig.run(request))[-1].end
    outage.limiter.settle(ticket, end)
    await outage.limiter.close()
    await outage.outbox.close()  # prefix-cache still down: the journal keeps the entry
    journal.close()
    clock, port = outage.clock, outage.port
    period = Periods.at(clock.now_ms()).month
    assert await _spent(store, period) == end.cost.cost_nanos
    kept = tmp_path / "kept.jsonl"
    shutil.copy(tmp_path / "data" / JOURNAL_NAME, kept)

    port.down = False
    for start in range(2):  # the restart, then the start after the host crash
        clock.advance(s=600)
        journal = Journal(tmp_path / "data")
        limiter = Limiter(
            store, UniformPolicies(POLICY), clock, lambda request: 0, timeout_s=PATIENT_S
        )
        assert await _outbox(port, journal, limiter, clock).flush() == 1
        await limiter.drain()
        journal.close()
        billed = await outage.billed()
        # the prefix expired meanwhile and the answer had no Plan: a write, above the estimate
        assert billed > end.cost.cost_nanos
        assert await _spent(store, period) == billed, f"start {start}"
        shutil.copy(kept, tmp_path / "data" / JOURNAL_NAME)  # the "done" line lost


async def test_an_entry_journalled_without_its_estimate_corrects_nothing(
    tmp_path: Path,
) -> None:
    """A line an older router wrote holds no estimate: it is billed, and the budgets keep what
    they counted (there is nothing to correct it by)."""
    core, clock = _core()
    await core.warm(TENANT, "old", "sim-large", _ask("Rule 1?", "old"), "")
    final = pc.CommitRequest(
        tenant=TENANT, request_id="old", phase=pc.COMMIT_PHASE_FINAL, output_tokens=3
    )
    journal = Journal(tmp_path)
    journal.add("e1", [final], {})
    journal.sync()
    corrections: list[tuple[str, int, int]] = []

    def corrected(tenant: str, correction_nanos: int, counted_ms: int, *, inherited: bool) -> None:
        corrections.append((tenant, correction_nanos, counted_ms))

    port = DownPort(PrefixCacheApi(core))
    port.down = False
    outbox = BillingOutbox(port, journal, 1.0, 0.01, estimate_billed=corrected, wall=clock)
    assert await outbox.flush() == 1
    assert corrections == []
    journal.close()


async def test_an_answer_served_once_its_bill_was_written_counts_its_estimate(
    tmp_path: Path, store: LimitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefix-cache down and the journal's fsync failing: the answer's bill is written to the
    journal but not known durable; the answer is served (its caller pays for it) and the entry
    is billed once prefix-cache is back. Its estimate must count, so that the replay's
    correction lands on it: before, nothing was counted and the correction took the month's
    spend below zero (billed 501,000, spend -3,888,000)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    request, ticket = await outage.admitted("r-next")
    request.cache.ClearField("semantic")  # L1 on: a model answer would be cached

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    pipeline = outage.rig.pipeline()
    with monkeypatch.context() as patched:
        patched.setattr("services.router.outbox_journal.os.fsync", failing_fsync)
        run = pipeline.run(TENANT, request, charge=partial(outage.limiter.charge, ticket))
        end = [chunk async for chunk in run][-1].end
        assert end.cost.estimated
        await pipeline.drain()
    outage.limiter.settle(ticket, end)
    await outage.limiter.drain()
    assert outage.outbox.pending == 1  # written, so billed later, and kept once
    month = Periods.at(outage.clock.now_ms()).month

    outage.clock.advance(s=60)
    outage.port.down = False
    assert await outage.outbox.flush() == 1
    await outage.limiter.drain()
    billed = await outage.billed()
    assert billed > 0
    assert await _spent(store, month) == billed


class DoneLost(Journal):
    """Keeps the file as it was just before an open call's "done" line (``image``): a host
    that crashes then (the line is not fsynced) restarts with that."""

    image: Path

    def done(self, entry_id: str) -> None:
        if self.is_open(entry_id):
            shutil.copy(self.path, self.image)
        super().done(entry_id)


async def test_an_answer_whose_done_line_a_crash_lost_counts_once(
    tmp_path: Path, store: LimitStore
) -> None:
    """An answer billed as usual (its FINAL made, its cost counted by its own settle); the host
    crashes before its open call's "done" line reaches the disk (not fsynced: within
    ROUTER_JOURNAL_SYNC_S), so the next start replays the open call. prefix-cache bills it
    once (its FINAL is first-wins) and says the replay's FINAL was a repeat; before, the
    replay's cost was counted again (billed 5,469,000, the budgets counted 10,938,000). A
    reply the restarted router lost does not make the repeat count: the entry is inherited,
    and whoever had the first reply was the process before."""
    crashed = DoneLost(tmp_path / "data")
    crashed.image = tmp_path / "image.jsonl"
    outage = await _outage(store, crashed, BEFORE_MIDNIGHT_MS - 3_600_000, earlier_turn=False)
    clock, core, port, limiter = outage.clock, outage.core, outage.port, outage.limiter
    port.down = False
    request, ticket = await outage.admitted("r-1")
    end = (await outage.rig.run(request))[-1].end
    limiter.settle(ticket, end)
    await limiter.drain()
    assert await outage.outbox.flush() == 0  # behind the "done" line's write: the image is taken
    crashed.close()
    assert not end.cost.estimated
    month = Periods.at(clock.now_ms()).month
    assert await _spent(store, month) == end.cost.cost_nanos

    shutil.copy(crashed.image, tmp_path / "data" / JOURNAL_NAME)  # the host crashed
    clock.advance(s=5)
    journal = Journal(tmp_path / "data")
    limiter = Limiter(store, UniformPolicies(POLICY), clock, lambda request: 0, timeout_s=PATIENT_S)
    # prefix-cache slow as the router restarts: the replay's first reply is lost, the next
    # is repeated, and was counted by the process before (review last12: counted twice)
    lost = LostReplyPort(port.api)
    lost.down, lost.lose_next_final = False, True
    outbox = _outbox(lost, journal, limiter, clock)
    assert await outbox.flush() == 0  # no reply: kept
    assert await outbox.flush() == 1  # the open call, again
    await limiter.drain()
    journal.close()
    billed = (await core.totals(TENANT)).cost_nanos
    assert billed == end.cost.cost_nanos  # one bill
    spent = await _spent(store, month)
    assert spent == billed, f"billed {billed}, the budgets count {spent}"


async def test_a_killed_routers_call_billed_at_each_start_of_a_crash_loop_counts_once(
    tmp_path: Path, store: LimitStore
) -> None:
    """A router killed mid-call leaves its open call in the journal; each start bills it and
    dies again before the "done" line is written (a crash loop, starts 10 min apart: past a
    settle's marker). prefix-cache bills it once (its FINAL first-wins) and answers every
    start's replay after the first as ``repeated``: the budgets count it once (before: once a
    start, by a marker kept until the month's end; 3 starts of a $0.0000006 call counted
    $0.0000018), in the day it started."""
    clock = ManualClock(BEFORE_MIDNIGHT_MS)
    started = Periods.at(clock.now_ms())
    core, _ = _core(clock)
    await core.warm(TENANT, "killed#0", "sim-large", _ask("Rule 1?", "killed"), "")
    final = pc.CommitRequest(
        tenant=TENANT, request_id="killed#0", phase=pc.COMMIT_PHASE_FINAL, output_tokens=3
    )
    journal = Journal(tmp_path / "data")
    journal.add("call", [final], {}, open_call=True, started_ms=clock.now_ms())
    journal.sync()
    journal.close()
    kept = tmp_path / "kept.jsonl"
    shutil.copy(tmp_path / "data" / JOURNAL_NAME, kept)
    port = DownPort(PrefixCacheApi(core))
    port.down = False
    for start in range(3):
        clock.advance(s=600)
        shutil.copy(kept, tmp_path / "data" / JOURNAL_NAME)  # the last "done" line lost
        journal = Journal(tmp_path / "data")
        limiter = Limiter(
            store, UniformPolicies(POLICY), clock, lambda request: 0, timeout_s=PATIENT_S
        )
        assert await _outbox(port, journal, limiter, clock).flush() == 1
        await limiter.drain()
        journal.close()
        billed = (await core.totals(TENANT)).cost_nanos
        assert billed > 0
        assert await _spent(store, started.month) == billed, f"start {start}"
    assert Periods.at(clock.now_ms()).day != started.day
    if isinstance(store, RedisLimitStore):  # (the in-memory store keeps only today's)
        assert await _spent(store, started.day) == billed


async def test_a_replay_after_a_restart_on_the_in_memory_store_leaves_no_negative_spend(
    tmp_path: Path,
) -> None:
    """Without the limits' Redis the counts start from none at a restart; the outbox's
    entries of the last process still carry the estimates counted then, and their replay
    corrects estimates this process never counted. Before, 3 answers left the month's spend
    at -11,664,000 (budget the tenant never had); now it stops at 0."""
    journal = Journal(tmp_path)
    outage = await _outage(MemoryLimitStore(), journal, BEFORE_MIDNIGHT_MS - 3_600_000)
    clock, port, limiter = outage.clock, outage.port, outage.limiter
    for i in range(3):
        request, ticket = await outage.admitted(f"r-{i}")
        end = (await outage.rig.run(request))[-1].end
        assert end.cost.estimated
        limiter.settle(ticket, end)
    await limiter.close()
    await outage.outbox.close()  # prefix-cache still down: the journal keeps the entries
    journal.close()

    clock.advance(s=60)  # the restart: a fresh store, prefix-cache back
    port.down = False
    store = MemoryLimitStore()
    limiter = Limiter(store, UniformPolicies(POLICY), clock, lambda request: 0, timeout_s=PATIENT_S)
    journal = Journal(tmp_path)
    assert await _outbox(port, journal, limiter, clock).flush() == 3
    await limiter.drain()
    journal.close()
    spent = await _spent(store, Periods.at(clock.now_ms()).month)
    assert spent == 0, spent


class LostReplyPort(DownPort):
    """prefix-cache records the next FINAL sent but its reply is lost (``DEADLINE_EXCEEDED``:
    slow as it comes back, say; ``lost_as``: how the call fails)."""

    def __init__(self, api: PrefixCacheApi, lost_as: Code = Code.DEADLINE_EXCEEDED) -> None:
        super().__init__(api)
        self.lose_next_final = False
        self.lost_as = lost_as

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        reply = await super().commit(request, deadline_s)
        if self.lose_next_final and request.phase == pc.COMMIT_PHASE_FINAL:
            self.lose_next_final = False
            raise CallFailed(self.lost_as, "the reply did not reach the router")
        return reply


# how a FINAL's call can fail once prefix-cache has recorded it: its reply late, the call
# cancelled, the connection reset (UNAVAILABLE: gRPC says the server may have seen it), a
# fault after the record (UNKNOWN, INTERNAL)
@pytest.mark.parametrize(
    "lost_as",
    [Code.DEADLINE_EXCEEDED, Code.CANCELLED, Code.UNAVAILABLE, Code.UNKNOWN, Code.INTERNAL],
)
async def test_a_replay_whose_reply_was_lost_still_corrects_the_estimate(
    tmp_path: Path, store: LimitStore, lost_as: Code
) -> None:
    """The outbox's replay of a kept answer reaches prefix-cache, which bills it, but its reply
    is lost: the entry stays, and the next round's reply is ``repeated``. No one had the
    first reply, so that one corrects the estimate (review fixes12: the estimate stayed
    counted, 4,389,000 for a 501,000 bill; then still so when the call failed otherwise than
    by its deadline or a cancel, a connection reset after the commit: UNAVAILABLE)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    port = LostReplyPort(outage.port.api, lost_as)
    outbox = _outbox(port, Journal(tmp_path / "lost"), outage.limiter, outage.clock)
    rig = Rig(prefix=port, outbox=outbox, models=outage.rig.models, wall=outage.clock)  # type: ignore[arg-type]
    request, ticket = await outage.admitted("r-next")
    end = (await rig.run(request))[-1].end
    outage.limiter.settle(ticket, end)
    await outage.limiter.drain()
    assert end.cost.estimated
    month = Periods.at(outage.clock.now_ms()).month

    port.down, port.lose_next_final = False, True
    assert await outbox.flush() == 0  # billed, but no reply: kept for the next round
    assert await outbox.flush() == 1
    await outage.limiter.drain()
    billed = await outage.billed()
    assert 0 < billed < end.cost.cost_nanos
    assert await _spent(store, month) == billed


async def test_a_correction_replayed_before_its_estimate_is_counted_ends_at_the_bill(
    tmp_path: Path, store: LimitStore
) -> None:
    """The outbox may bill a kept answer before the answer's own settle counts its estimate
    (the servicer settles once the client has read the end). The correction then lands first,
    on a period that counts less than it; the two must still add up to the bill (a correction
    stopped at zero, then the whole estimate, over-counted it: review fixes12)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    request, ticket = await outage.admitted("r-next")
    end = (await outage.rig.run(request))[-1].end
    assert end.cost.estimated
    outage.port.down = False
    assert await outage.outbox.flush() == 1  # the correction, first
    await outage.limiter.drain()
    outage.limiter.settle(ticket, end)  # then the answer's estimate
    await outage.limiter.drain()
    month = Periods.at(outage.clock.now_ms()).month
    assert await _spent(store, month) == await outage.billed()


async def test_an_answer_read_past_midnight_counts_its_estimate_where_its_correction_lands(
    tmp_path: Path, store: LimitStore
) -> None:
    """An answer ends at 23:59:59.9 UTC on the month's last day with prefix-cache down: the
    outbox keeps its bill, journalled as counted then. Its caller reads the end a second
    later, past midnight, and only then does the Gateway settle the request, counting the
    estimate. The replay's correction lands in the day and month the entry was counted in, so
    the estimate must count there too: before, it counted in the new day and month and its
    correction in the old ones (each month wrong by the estimate, the old one below zero)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MONTH_END_MS)
    servicer = outage.gateway(outage.rig.pipeline())
    estimate = 0
    async for chunk in servicer.StreamComplete(_ask("And rule 2?", "r-late"), FakeContext()):  # type: ignore[arg-type]
        if chunk.WhichOneof("part") == "end":
            assert chunk.end.cost.estimated
            estimate = chunk.end.cost.cost_nanos
            outage.clock.advance(s=1)  # the caller reads the end past midnight
    await outage.limiter.drain()
    ended, read = Periods.at(BEFORE_MONTH_END_MS), Periods.at(outage.clock.now_ms())
    assert (read.day, read.month) != (ended.day, ended.month)

    outage.port.down = False
    assert await outage.outbox.flush() == 1
    await outage.limiter.drain()
    billed = await outage.billed()
    assert 0 < billed < estimate
    new = await _spent(store, read.month)
    assert new == 0, f"estimate {estimate}, billed {billed}: the new month counts {new}"
    assert await _spent(store, read.day) == 0
    if isinstance(store, RedisLimitStore):  # (the in-memory store keeps only today's)
        assert await _spent(store, ended.month) == billed
        assert await _spent(store, ended.day) == billed


class SlowSync(Journal):
    """A journal whose fsync takes a second of ``clock`` (a slow disk)."""

    clock: ManualClock

    def sync(self, *, fsync: bool = True) -> None:
        super().sync(fsync=fsync)
        if fsync:
            self.clock.advance(s=1)


async def test_a_call_cut_at_midnight_counts_its_estimate_where_its_correction_lands(
    tmp_path: Path, store: LimitStore
) -> None:
    """The caller leaves mid-answer at 23:59:59.9 UTC on the month's last day with prefix-cache
    down: the call's bill goes to the outbox, journalled as counted then, and its fsync ends
    past midnight, when the call's estimate is charged to the tenant. It must count where the
    replay's correction lands (before: the estimate in the new month, its correction in the
    old one)."""
    journal = SlowSync(tmp_path)
    outage = await _outage(store, journal, BEFORE_MONTH_END_MS)
    journal.clock = outage.clock
    request, ticket = await outage.admitted("r-left")
    pipeline = outage.rig.pipeline()
    charge = partial(outage.limiter.charge, ticket)
    async with contextlib.aclosing(pipeline.run(TENANT, request, charge=charge)) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves
    await pipeline.drain()  # its bill, to the outbox
    outage.limiter.settle(ticket, None)  # the servicer's, for a request with no answer
    await outage.limiter.drain()
    assert outage.outbox.pending == 1
    left, charged = Periods.at(BEFORE_MONTH_END_MS), Periods.at(outage.clock.now_ms())
    assert charged.month != left.month

    outage.port.down = False
    assert await outage.outbox.flush() == 1
    await outage.limiter.drain()
    billed = await outage.billed()
    assert billed > 0
    new = await _spent(store, charged.month)
    assert new == 0, f"billed {billed}: the new month counts {new}"
    if isinstance(store, RedisLimitStore):  # (the in-memory store keeps only today's)
        assert await _spent(store, left.month) == billed


class FullOnce(Journal):
    """A disk that is full for the next answer's bill (its line is not written: ENOSPC), not
    for the open calls' lines, written before."""

    full = True

    def add(
        self,
        entry_id: str,
        commits: Sequence[pc.CommitRequest],
        carrier: Mapping[str, str] | None = None,
        *,
        open_call: bool = False,
        started_ms: int | None = None,
        counted: Counted | None = None,
    ) -> None:
        if self.full and not open_call:
            self.full = False
            raise OSError(28, "No space left on device")
        super().add(
            entry_id, commits, carrier, open_call=open_call, started_ms=started_ms, counted=counted
        )


class HungFinalPort(DownPort):
    """prefix-cache up, but the next FINAL fails before it is recorded (``fails_as``: not
    answered in time, hung; UNAVAILABLE: a connection refused)."""

    def __init__(self, api: PrefixCacheApi, fails_as: Code = Code.DEADLINE_EXCEEDED) -> None:
        super().__init__(api)
        self.down, self.hang_next_final, self.fails_as = False, True, fails_as

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if self.hang_next_final and request.phase == pc.COMMIT_PHASE_FINAL:
            self.hang_next_final = False
            raise CallFailed(self.fails_as, "prefix-cache did not take the FINAL")
        return await super().commit(request, deadline_s)


async def test_an_answer_whose_bill_could_not_be_written_is_billed_once_as_produced(
    tmp_path: Path, store: LimitStore
) -> None:
    """The answer's FINAL times out and the outbox cannot write its bill (disk full): the bill
    is held in memory and the answer served (its caller pays for it), billed once as
    produced. Before, the call's open call (journalled as it started,
    with the output tokens then: none) was left to the replay beside that second entry: the
    replay billed the call at the open call's 0 output tokens and counted it, and the second
    entry, a repeat, kept its estimate counted as well (the spend the estimate plus the bill)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    port = HungFinalPort(outage.port.api)
    outbox = _outbox(port, FullOnce(tmp_path / "full"), outage.limiter, outage.clock)
    rig = Rig(prefix=port, outbox=outbox, models=outage.rig.models, wall=outage.clock)  # type: ignore[arg-type]
    request, ticket = await outage.admitted("r-next")
    pipeline = rig.pipeline()
    run = pipeline.run(TENANT, request, charge=partial(outage.limiter.charge, ticket))
    end = [chunk async for chunk in run][-1].end
    assert end.cost.estimated
    await pipeline.drain()
    outage.limiter.settle(ticket, end)
    await outage.limiter.drain()
    month = Periods.at(outage.clock.now_ms()).month

    assert await outbox.flush() == 1  # the call's one bill
    await outage.limiter.drain()
    billed = await outage.billed()
    assert (await outage.core.totals(TENANT)).output_tokens > 3  # the earlier turn's, and its
    spent = await _spent(store, month)
    assert spent == billed, f"billed {billed}: spend {spent}"


# how the answer's own FINAL can fail once prefix-cache has recorded it: its reply late (the
# request's prefix-cache calls end there), the connection reset, a fault after the record
@pytest.mark.parametrize("lost_as", [Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE, Code.INTERNAL])
async def test_an_answer_whose_own_final_reply_was_lost_corrects_its_estimate(
    tmp_path: Path, store: LimitStore, lost_as: Code
) -> None:
    """prefix-cache records the answer's own FINAL but its reply does not reach the router:
    the outbox keeps the bill and the answer is served estimated, its estimate counted. The
    replay's reply is ``repeated``, yet no one had the first: this process kept the entry
    only because no reply to its FINAL came. Before, the estimate stayed counted (4,389,000
    for a 501,000 bill, for the rest of the day and month); now the spend is the bill."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    port = LostReplyPort(outage.port.api, lost_as)
    outbox = _outbox(port, Journal(tmp_path / "lost"), outage.limiter, outage.clock)
    rig = Rig(prefix=port, outbox=outbox, models=outage.rig.models, wall=outage.clock)  # type: ignore[arg-type]
    port.down, port.lose_next_final = False, True  # prefix-cache up: the answer's FINAL lands
    request, ticket = await outage.admitted("r-next")
    end = (await rig.run(request))[-1].end
    outage.limiter.settle(ticket, end)
    await outage.limiter.drain()
    assert end.cost.estimated and outbox.pending == 1
    month = Periods.at(outage.clock.now_ms()).month
    billed = await outage.billed()
    assert 0 < billed < end.cost.cost_nanos  # billed already, its system prompt a read

    assert await outbox.flush() == 1
    await outage.limiter.drain()
    assert await outage.billed() == billed  # the replay is a no-op at prefix-cache
    spent = await _spent(store, month)
    assert spent == billed, f"estimate {end.cost.cost_nanos}, billed {billed}: spend {spent}"


async def test_a_call_whose_bill_was_made_after_its_keep_failed_is_not_replayed(
    tmp_path: Path, store: LimitStore
) -> None:
    """The answer's FINAL is refused (prefix-cache restarting) and the outbox cannot write its
    bill (disk full): the answer is served and its bill held in memory (its estimate counted),
    which the replay bills once, the budgets corrected to that bill; the call's open call is
    the same entry, not replayed beside it (its reply, a repeat, would count it again now that
    a repeat of an entry this process kept is a first reply lost)."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    port = HungFinalPort(outage.port.api, Code.UNAVAILABLE)
    outbox = _outbox(port, FullOnce(tmp_path / "full"), outage.limiter, outage.clock)
    rig = Rig(prefix=port, outbox=outbox, models=outage.rig.models, wall=outage.clock)  # type: ignore[arg-type]
    request, ticket = await outage.admitted("r-next")
    pipeline = rig.pipeline()
    run = pipeline.run(TENANT, request, charge=partial(outage.limiter.charge, ticket))
    end = [chunk async for chunk in run][-1].end
    assert end.cost.estimated
    await pipeline.drain()  # the bill held
    outage.limiter.settle(ticket, end)
    await outage.limiter.drain()
    before = await outage.billed()

    assert await outbox.flush() == 1  # the held bill, once
    assert await outbox.flush() == 0  # nothing left to bill
    await outage.limiter.drain()
    billed = await outage.billed()
    assert billed > before
    spent = await _spent(store, Periods.at(outage.clock.now_ms()).month)
    assert spent == billed, f"billed {billed}: spend {spent}"


class HeldSync(Journal):
    """A disk whose next durable fsync (``hold``) waits until ``go`` (slow)."""

    hold = False

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.syncing, self.go = threading.Event(), threading.Event()

    def sync(self, *, fsync: bool = True) -> None:
        if fsync and self.hold:
            self.hold = False
            self.syncing.set()
            self.go.wait(timeout=10)
        super().sync(fsync=fsync)


async def _leave_while_the_bill_syncs(
    outage: Outage, port: object, outbox: BillingOutbox, journal: HeldSync
) -> None:
    """One request through ``port`` whose caller leaves while the journal syncs its answer's
    bill (held there until the caller is gone), then the call's bill without its answer and
    the request's settle, drained."""
    rig = Rig(prefix=port, outbox=outbox, models=outage.rig.models, wall=outage.clock)  # type: ignore[arg-type]
    journal.hold = True
    request, ticket = await outage.admitted("r-left")
    pipeline = rig.pipeline()

    async def ask() -> None:
        run = pipeline.run(TENANT, request, charge=partial(outage.limiter.charge, ticket))
        [chunk async for chunk in run]

    asked = asyncio.ensure_future(ask())
    assert await asyncio.to_thread(journal.syncing.wait, 10)  # the answer's bill, syncing
    asked.cancel()  # the caller leaves
    with pytest.raises(asyncio.CancelledError):
        await asked
    journal.go.set()
    await pipeline.drain()  # its bill without an answer
    outage.limiter.settle(ticket, None)
    await outage.limiter.drain()


async def test_an_answer_cancelled_while_its_bill_is_kept_is_kept_once(
    tmp_path: Path, store: LimitStore
) -> None:
    """prefix-cache records the answer's FINAL but its reply is lost, and the caller leaves while
    the outbox's journal syncs the answer's bill (a slow disk): the call is billed as one that
    ended without its answer, its estimate counted, and its bill kept in the place of the
    answer's (one entry; not a second one beside it, each of whose replays, repeats of an
    entry this process kept, would correct the budgets: the spend twice the bill less the
    estimate)."""
    journal = HeldSync(tmp_path / "held")
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    port = LostReplyPort(outage.port.api)
    outbox = _outbox(port, journal, outage.limiter, outage.clock)
    port.down, port.lose_next_final = False, True
    await _leave_while_the_bill_syncs(outage, port, outbox, journal)  # billed without it
    assert outbox.pending == 1

    assert await outbox.flush() == 1
    await outage.limiter.drain()
    billed = await outage.billed()
    assert billed > 0
    spent = await _spent(store, Periods.at(outage.clock.now_ms()).month)
    assert spent == billed, f"billed {billed}: spend {spent}"


def _done_not_run(monkeypatch: pytest.MonkeyPatch, journal: Journal) -> asyncio.Event:
    """The journal's next batch holding a "done" is not run (no thread could be started for
    it: ``JournalThread``'s "journal batch not run"), so its entry stays pending. The event is
    set once it was not."""
    real = asyncio.to_thread
    lost = asyncio.Event()

    async def to_thread(func: Callable[..., T], /, *args: object, **kwargs: object) -> T:
        batch = args[0] if args else None
        if (
            not lost.is_set()
            and isinstance(batch, list)
            and any(getattr(call.run, "func", None) == journal.done for call in batch)
        ):
            lost.set()
            raise RuntimeError("can't start new thread")
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    return lost


async def test_an_answer_whose_done_line_was_not_run_is_not_counted_again(
    tmp_path: Path, store: LimitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer billed as usual (its FINAL made, its cost counted by its own settle) whose
    open call's "done" is not run: the entry stays pending, no longer the call's. It is done
    at the next round, not sent: its replay would be a repeat of an entry this process kept,
    counted as a first reply lost (the spend twice the bill)."""
    journal = Journal(tmp_path / "data")
    outage = await _outage(store, journal, BEFORE_MIDNIGHT_MS - 3_600_000)
    outage.port.down = False
    lost = _done_not_run(monkeypatch, journal)
    request, ticket = await outage.admitted("r-1")
    end = (await outage.rig.run(request))[-1].end
    outage.limiter.settle(ticket, end)
    await outage.limiter.drain()
    assert not end.cost.estimated
    await asyncio.wait_for(lost.wait(), 10)  # bounded: a "done" never batched fails, not hangs

    assert await outage.outbox.flush() == 0  # nothing to bill
    await outage.limiter.drain()
    assert outage.outbox.pending == 0
    billed = await outage.billed()
    spent = await _spent(store, Periods.at(outage.clock.now_ms()).month)
    assert spent == billed, f"billed {billed}: spend {spent}"


async def test_a_replayed_entry_whose_done_line_was_not_run_is_not_counted_again(
    tmp_path: Path, store: LimitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept answer's replay is billed and corrects its estimate, but its "done" is not run:
    the entry stays pending. The next round does it, not sends it (a repeat of an entry this
    process kept: its correction made again, the spend twice the bill less the estimate)."""
    journal = Journal(tmp_path / "data")
    outage = await _outage(store, journal, BEFORE_MIDNIGHT_MS - 3_600_000)
    request, ticket = await outage.admitted("r-1")
    end = (await outage.rig.run(request))[-1].end
    outage.limiter.settle(ticket, end)
    assert end.cost.estimated

    outage.port.down = False
    _done_not_run(monkeypatch, journal)
    assert await outage.outbox.flush() == 1
    assert outage.outbox.pending == 1  # its "done" not run
    assert await outage.outbox.flush() == 0  # done now, not billed again
    await outage.limiter.drain()
    assert outage.outbox.pending == 0
    billed = await outage.billed()
    spent = await _spent(store, Periods.at(outage.clock.now_ms()).month)
    assert spent == billed, f"billed {billed}: spend {spent}"


class Thinking(Engine):
    """A reasoning model that stops at max_tokens while it still thinks: its answer has no
    text and no block (as any empty reply), its end counting the thinking's tokens."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=self.prompt_tokens)
        end = model_pb2.GenerateEnd(output_tokens=400, stop_reason="max_tokens")
        return FakeStream([model_pb2.GenerateChunk(start=start), model_pb2.GenerateChunk(end=end)])


# the caller's method, and how many chunks it reads before it leaves (None: all of them)
@pytest.mark.parametrize(
    ("method", "reads"),
    [("StreamComplete", 1), ("StreamComplete", 2), ("StreamComplete", None), ("Complete", None)],
)
@pytest.mark.parametrize("text", [False, True], ids=["empty", "text"])
@pytest.mark.parametrize("prefix_up", [True, False], ids=["billed", "kept"])
async def test_an_answer_counts_once_wherever_its_caller_leaves(
    tmp_path: Path,
    store: LimitStore,
    method: str,
    reads: int | None,
    text: bool,
    prefix_up: bool,
) -> None:
    """A streamed answer with no text (a reasoning model stopped at max_tokens while it
    thought, any empty reply) has its start sent after its bill is made or kept, and its end
    after that. Before, the Gateway counted it against the budgets only once the caller had
    read its end: a caller leaving as the start was written left it counted nowhere (prefix-cache
    up: billed 6,456,000, spend 0), and with the bill kept in the outbox the replay's
    correction landed on nothing (the month's spend -3,888,000). Wherever the caller leaves,
    after whichever chunk, the tenant's spend is what prefix-cache billed, once: the answer's
    bill, or the bill of a call it left mid-answer."""
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    outage.port.down = not prefix_up
    prompt = outage.rig.models.prompt_tokens  # type: ignore[attr-defined]
    outage.rig.models = Engine(prompt) if text else Thinking(prompt)
    pipeline = outage.rig.pipeline()
    servicer = outage.gateway(pipeline)
    request = _ask("And rule 2?", "r-left")
    if method == "Complete":
        end = await servicer.Complete(request, FakeContext())  # type: ignore[arg-type]
        assert end.cost.estimated is not prefix_up
    else:
        stream = cast(
            AsyncGenerator[pb.CompleteChunk, None],
            servicer.StreamComplete(request, FakeContext()),  # type: ignore[arg-type]
        )
        read = 0
        async with contextlib.aclosing(stream) as chunks:
            async for _ in chunks:
                read += 1
                if read == reads:
                    break  # the caller leaves
    await pipeline.drain()  # a call left mid-answer is billed in the background
    await outage.limiter.drain()
    if not prefix_up:
        assert outage.outbox.pending == 1
        outage.port.down = False
        assert await outage.outbox.flush() == 1
        await outage.limiter.drain()
    billed = await outage.billed()
    assert billed > 0
    spent = await _spent(store, Periods.at(outage.clock.now_ms()).month)
    assert spent == billed, f"billed {billed}: spend {spent}"


class HeldThenSynced(HeldSync):
    """``HeldSync`` that also says when the held fsync is over (``synced``)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.synced = threading.Event()

    def sync(self, *, fsync: bool = True) -> None:
        held = fsync and self.hold
        super().sync(fsync=fsync)
        if held:
            self.synced.set()


async def test_a_bill_whose_keep_a_forced_shutdown_cancelled_corrects_a_counted_estimate(
    tmp_path: Path, store: LimitStore
) -> None:
    """The caller leaves mid-answer with prefix-cache down: the call's bill goes to the
    outbox, and the router is stopped by force while the journal syncs it (every task
    cancelled: the bill's count against the budgets never runs). Its line is in the journal
    with its estimate as counted; the next start replays it and corrects that estimate. Before,
    the estimate was counted only once the keep returned, so the correction landed on nothing
    (billed 546,000, the month's spend -3,888,000)."""
    if isinstance(store, MemoryLimitStore):
        pytest.skip("counts in memory start from none at a restart: nothing is corrected")
    journal = HeldThenSynced(tmp_path / "data")
    outage = await _outage(store, journal, BEFORE_MIDNIGHT_MS - 3_600_000)
    request, ticket = await outage.admitted("r-left")
    pipeline = outage.rig.pipeline()
    charge = partial(outage.limiter.charge, ticket)
    journal.hold = True  # the bill's keep: a slow fsync
    async with contextlib.aclosing(pipeline.run(TENANT, request, charge=charge)) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves
    assert await asyncio.to_thread(journal.syncing.wait, 10)
    bills = list(pipeline._background)
    for task in bills:  # a forced shutdown: every task cancelled
        task.cancel()
    await asyncio.gather(*bills, return_exceptions=True)
    journal.go.set()
    assert await asyncio.to_thread(journal.synced.wait, 10)
    outage.limiter.settle(ticket, None)
    await outage.limiter.close()
    journal.close()
    month = Periods.at(outage.clock.now_ms()).month

    outage.clock.advance(s=60)  # the next start, prefix-cache back
    outage.port.down = False
    restarted = Journal(tmp_path / "data")
    limiter = Limiter(
        store, UniformPolicies(POLICY), outage.clock, lambda request: 0, timeout_s=PATIENT_S
    )
    assert await _outbox(outage.port, restarted, limiter, outage.clock).flush() == 1
    await limiter.drain()
    restarted.close()
    billed = await outage.billed()
    assert billed > 0
    spent = await _spent(store, month)
    assert spent == billed, f"billed {billed}: spend {spent}"


async def test_an_answer_kept_by_a_router_killed_before_its_caller_read_it_is_corrected_once(
    tmp_path: Path, store: LimitStore
) -> None:
    """An estimated answer (prefix-cache down) whose caller reads its end slowly: the router is
    killed before the Gateway settles the request. Its bill's line is in the journal with its
    estimate as counted, and the next start's replay corrects that estimate. Before, the
    estimate was counted only by the settle, which never ran: the correction landed on
    nothing (the month's spend below zero)."""
    if isinstance(store, MemoryLimitStore):
        pytest.skip("counts in memory start from none at a restart: nothing is corrected")
    journal = Journal(tmp_path / "data")
    outage = await _outage(store, journal, BEFORE_MIDNIGHT_MS - 3_600_000)
    request, _ = await outage.admitted("r-slow")
    end = (await outage.rig.run(request))[-1].end
    assert end.cost.estimated
    await outage.limiter.drain()  # killed: no settle; the counts sent so far land
    journal.close()
    month = Periods.at(outage.clock.now_ms()).month

    outage.clock.advance(s=60)
    outage.port.down = False
    journal = Journal(tmp_path / "data")
    limiter = Limiter(
        store, UniformPolicies(POLICY), outage.clock, lambda request: 0, timeout_s=PATIENT_S
    )
    assert await _outbox(outage.port, journal, limiter, outage.clock).flush() == 1
    await limiter.drain()
    journal.close()
    billed = await outage.billed()
    assert 0 < billed < end.cost.cost_nanos
    spent = await _spent(store, month)
    assert spent == billed, f"estimate {end.cost.cost_nanos}, billed {billed}: spend {spent}"


async def test_a_bill_kept_then_made_by_its_final_takes_its_estimate_back(
    tmp_path: Path, store: LimitStore
) -> None:
    """The answer's FINAL is refused (prefix-cache restarting, a connection refused) and the
    caller leaves while the outbox's journal syncs the answer's bill: its line is written, its
    estimate counted, but the keep is not known to have been. The call's bill without its
    answer sends the FINAL again, which prefix-cache takes: that bill counts, the entry is
    settled unreplayed, and the estimate it counted is taken back (else the spend would be
    the bill plus the estimate)."""
    journal = HeldSync(tmp_path / "held")
    outage = await _outage(store, Journal(tmp_path), BEFORE_MIDNIGHT_MS - 3_600_000)
    port = HungFinalPort(outage.port.api, Code.UNAVAILABLE)
    outbox = _outbox(port, journal, outage.limiter, outage.clock)
    await _leave_while_the_bill_syncs(outage, port, outbox, journal)  # its FINAL made after
    assert await outbox.flush() == 0  # nothing left to bill
    assert outbox.pending == 0
    await outage.limiter.drain()
    billed = await outage.billed()
    assert billed > 0
    spent = await _spent(store, Periods.at(outage.clock.now_ms()).month)
    assert spent == billed, f"billed {billed}: spend {spent}"
