"""A FINAL whose WARM prefix-cache did not take is not sent: it goes to the billing outbox
behind that WARM; and a FINAL prefix-cache refuses for want of its WARM is no degradation.

A review killed the stack's Redis during 40 requests at 4 in flight: the WARM commits that
failed meanwhile (UNAVAILABLE, counted and logged as prefix-cache degrading, as they are) were
each followed by the answer's FINAL, which prefix-cache, its Redis back, refused
FAILED_PRECONDITION ("no WARM commit for request_id ..."): a doomed call, counted as a second
degradation (``cachemesh_router_degraded_total{dependency="prefix-cache",
reason="FAILED_PRECONDITION"} 6``) and logged as a WARNING "prefix-cache unavailable
(FAILED_PRECONDITION: no WARM commit ...)", which inflated ``CachemeshDependencyDegraded``. The
outbox then replayed the WARM and the FINAL, in that order, and billed them right.

prefix-cache here is the real core behind a port that refuses WARM commits while its Redis
is "down" and can be restarted (its state, in memory, lost) before a FINAL; the money is what
the core's totals say, against a turn whose commits were all taken.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.common.metrics import TenantLabels, new_registry
from services.common.models import ModelTable
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from services.router.dependencies import CallFailed, Dependencies
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_outbox_replay import TENANT, Engine, _ask, _core
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeClock,
    FakeSemantic,
    _settings,
)

_TOTALS = ("requests", "input_tokens", "cache_read_input_tokens", "output_tokens", "cost_nanos")


class FlakyPort:
    """prefix-cache's API as the router's port. ``warm_down``: WARM commits fail UNAVAILABLE
    (its Redis down). ``restart_before_final``: the next FINAL finds a prefix-cache started
    afresh (its state in memory lost)."""

    def __init__(self, core: PrefixCacheCore, clock: ManualClock) -> None:
        self.core, self.api, self.clock = core, PrefixCacheApi(core), clock
        self.warm_down = False
        self.restart_before_final = False
        self.sent: list[str] = []  # each commit's phase as the router sent it

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return await self.api.plan(request)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.sent.append(pc.CommitPhase.Name(request.phase).removeprefix("COMMIT_PHASE_"))
        if request.phase == pc.COMMIT_PHASE_WARM and self.warm_down:
            raise CallFailed(Code.UNAVAILABLE, "prefix-cache's Redis is unreachable")
        if request.phase == pc.COMMIT_PHASE_FINAL and self.restart_before_final:
            self.restart_before_final = False
            self.core, _ = _core(self.clock)
            self.api = PrefixCacheApi(self.core)
        try:
            return await self.api.commit(request)
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message) from exc


def _degraded(registry: CollectorRegistry) -> dict[str, float]:
    """``cachemesh_router_degraded_total`` of prefix-cache, by reason (those above 0)."""
    counts: dict[str, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            named = sample.name == "cachemesh_router_degraded_total"
            if named and sample.value and sample.labels["dependency"] == "prefix-cache":
                counts[sample.labels["reason"]] = sample.value
    return counts


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class Stack:
    """A router's pipeline (with its metrics and a journalled outbox) on ``FlakyPort``."""

    def __init__(self, tmp: Path) -> None:
        core, self.clock = _core()
        self.port = FlakyPort(core, self.clock)
        self.registry = new_registry()
        self.outbox = BillingOutbox(self.port, Journal(tmp), 1.0, 0.01)
        self.prompt_tokens = 0

    async def warm_earlier(self) -> None:
        """The system prompt warm from a turn a minute before."""
        core = self.port.core
        await core.warm(TENANT, "earlier", "sim-large", _ask("Rule 1?", "earlier"), "")
        await core.final(TENANT, "earlier", "sim-large", 3, 0, "")
        self.clock.advance(s=60)
        split = (await core.plan(TENANT, "sim-large", _ask("And rule 2?", ""), [])).split
        self.prompt_tokens = split.prompt_tokens

    def pipeline(self) -> Pipeline:
        models = Engine(self.prompt_tokens)
        deps = Dependencies(FakeSemantic(), self.port, models, REPLICAS)
        router = (load_router_model(), RouterCard.load().default_threshold, None)
        return Pipeline(
            deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=FakeClock(),
            metrics=RouterMetrics(self.registry, TenantLabels(4)), outbox=self.outbox,
            wall=self.clock,
        )  # fmt: skip

    async def answer(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        """One whole answer (``Complete``) through a new pipeline, drained (its bills sent or
        kept): its end."""
        pipeline = self.pipeline()
        run = pipeline.run(TENANT, request, streamed=False)
        end = [chunk async for chunk in run][-1].end
        await pipeline.drain()
        return end

    async def totals(self) -> dict[str, int]:
        totals = await self.port.core.totals(TENANT)
        return {f: getattr(totals, f) for f in _TOTALS}


async def _answered(tmp: Path, *, warm_down: bool, restart: bool = False) -> dict[str, object]:
    """One whole answer (``Complete``) on a warm prefix; then prefix-cache is well again and
    the outbox replays what it kept. Returns what the router counted and sent, and what the
    tenant was billed (the totals' growth)."""
    stack = Stack(tmp)
    await stack.warm_earlier()
    before = await stack.totals()
    stack.port.warm_down = warm_down
    stack.port.restart_before_final = restart
    end = await stack.answer(_ask("And rule 2?", "r-next"))
    sent, degraded = list(stack.port.sent), _degraded(stack.registry)
    stack.port.warm_down = False
    if restart:
        before = await stack.totals()  # the restarted core's: the earlier turn's bill is gone
    kept = await stack.outbox.flush()  # the bills it replays
    replayed = stack.port.sent[len(sent) :]
    after = await stack.totals()
    return {
        "sent": sent,
        "degraded": degraded,
        "kept": kept,
        "replayed": replayed,
        "estimated": end.cost.estimated,
        "billed": {f: after[f] - before[f] for f in _TOTALS},
    }


async def test_a_final_whose_warm_failed_goes_to_the_outbox_without_a_doomed_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = await _answered(tmp_path / "taken", warm_down=False)
    assert (taken["sent"], taken["degraded"], taken["kept"]) == (["WARM", "FINAL"], {}, 0)
    caplog.clear()
    lost = await _answered(tmp_path / "lost", warm_down=True)
    print("taken:", taken)
    print("WARM lost:", lost)
    # the WARM's failure is the one degradation; no FINAL is sent (it would be refused)
    assert lost["degraded"] == {"UNAVAILABLE": 1}, lost["degraded"]
    assert lost["sent"] == ["WARM"], lost["sent"]
    assert not [w for w in _warnings(caplog) if "FAILED_PRECONDITION" in w], _warnings(caplog)
    # kept, the WARM before the FINAL, and billed by the replay as the taken turn was
    assert lost["kept"] == 1 and lost["estimated"]
    assert lost["replayed"] == ["WARM", "FINAL"]
    assert lost["billed"] == taken["billed"], (lost["billed"], taken["billed"])


async def test_the_bill_of_a_call_ended_early_whose_warm_failed_is_kept_without_a_final(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller leaves after the first words: the call's bill without its answer."""
    stack = Stack(tmp_path)
    await stack.warm_earlier()
    before = await stack.totals()
    stack.port.warm_down = True
    pipeline = stack.pipeline()
    run = pipeline.run(TENANT, _ask("And rule 2?", "r-left"))
    async with contextlib.aclosing(run) as chunks:
        async for chunk in chunks:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves
    await pipeline.drain()
    print("left:", stack.port.sent, _degraded(stack.registry))
    assert _degraded(stack.registry) == {"UNAVAILABLE": 1}
    assert stack.port.sent == ["WARM"]
    assert not [w for w in _warnings(caplog) if "FAILED_PRECONDITION" in w], _warnings(caplog)
    stack.port.warm_down = False
    assert await stack.outbox.flush() == 1
    billed = await stack.totals()
    assert billed["requests"] - before["requests"] == 1
    assert billed["cache_read_input_tokens"] > before["cache_read_input_tokens"]  # a read


async def test_a_final_refused_for_a_warm_prefix_cache_lost_is_no_degradation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The WARM was taken, then prefix-cache restarted with its state in memory before the
    FINAL: refused FAILED_PRECONDITION. prefix-cache is up and answering: not counted as it
    degrading; a WARNING says its WARM was lost, and the outbox bills the call once."""
    caplog.set_level(logging.INFO)
    result = await _answered(tmp_path, warm_down=False, restart=True)
    print("restarted:", result)
    assert result["sent"] == ["WARM", "FINAL"]
    assert result["degraded"] == {}, result["degraded"]
    assert result["kept"] == 1 and result["estimated"]
    warnings = _warnings(caplog)
    assert any("no longer holds" in w and "r-next" in w for w in warnings), warnings
    assert not [w for w in warnings if "unavailable" in w], warnings
    billed = result["billed"]
    assert isinstance(billed, dict) and billed["requests"] == 1


_NO_DRAFT = {"draft_model": None, "draft_tokens": 0, "draft_acceptance_rate": None}


class TwoTablesPort(FlakyPort):
    """Two prefix-cache replicas on one ledger (a rolling deploy): every WARM reaches the one
    whose table has the request's model, every FINAL the one whose table lacks it. An error
    of the core that is no ``RequestError`` reaches the router as gRPC's servicer sends it:
    UNKNOWN, "Unexpected <class ...>"."""

    def __init__(self, clock: ManualClock, lacks: str, *, plans: bool = False) -> None:
        """``plans``: the replica with the model keeps its Plans' prompts (a ``plan_id``)."""
        ledger = InMemoryLedger(CommitRecords(3_600_000), TotalsLedger())  # the shared Redis
        models = {
            k: v.model_copy(update=_NO_DRAFT) if v.draft_model == lacks else v
            for k, v in TABLE.models.items()
            if k != lacks
        }
        auto = {tier: m if m != lacks else next(k for k, v in models.items() if v.tier == tier)
                for tier, m in TABLE.auto.items()}  # fmt: skip
        lacking = ModelTable(models=models, auto=auto)
        has, other = (
            PrefixCacheCore(
                table=table,
                tokenizer=TokenizerSlot(TOKENIZER),
                cache=InMemoryWarmStore(),
                views=ReplicaViews(65536),
                ledger=ledger,
                clock=clock,
                lookback=20,
                plans=PlanMemo(clock, ttl_ms=60_000, max_blocks=1 << 20)
                if plans and table is TABLE
                else None,
            )
            for table in (TABLE, lacking)
        )
        super().__init__(has, clock)
        self.lacking = PrefixCacheApi(other)
        self.deployed = False  # True: the deploy is done, every call reaches ``has``

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.sent.append(pc.CommitPhase.Name(request.phase).removeprefix("COMMIT_PHASE_"))
        final = request.phase == pc.COMMIT_PHASE_FINAL
        api = self.lacking if final and not self.deployed else self.api
        try:
            return await api.commit(request)
        except RequestError as exc:  # its mark as the gRPC adapter reads it from the trailer
            raise CallFailed(exc.code, exc.message, mark=exc.mark) from exc
        except Exception as exc:  # as grpc.aio's servicer answers an unhandled exception
            raise CallFailed(Code.UNKNOWN, f"Unexpected {type(exc)}: {exc}") from exc


async def test_a_final_on_a_replica_whose_table_lacks_the_model_is_kept_until_one_has_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The FINAL reaches a prefix-cache replica whose model table lacks the WARM's model:
    refused FAILED_PRECONDITION naming the model (marked ``table-lacks-model``), no
    degradation of prefix-cache (it answers), a WARNING; the outbox's replay, refused so
    again, keeps the entry (a throttled WARNING naming the model), and once the deploy is done
    (the FINAL reaches a replica with the model) bills it once, as a taken turn is billed.
    Before, the replay dropped the bill at its first round (``(dropped, pending) == ([1],
    0)``, the turn never billed: an answer served, its provider paid, unbilled); before that,
    the core's assertion was UNKNOWN, a degradation."""
    caplog.set_level(logging.INFO)
    stack = Stack(tmp_path / "unused")  # its outbox on the port replaced
    port = TwoTablesPort(stack.clock, lacks="sim-small")
    stack.port = port
    await stack.warm_earlier()
    port.sent.clear()
    dropped: list[int] = []
    stack.outbox = BillingOutbox(
        port, Journal(tmp_path / "router"), 1.0, 0.01, dropped=dropped.append
    )
    request = _ask("And rule 2?", "r-next")
    request.model = "auto"  # routed to the small tier: its FINAL's baseline is the large model
    request.routing.threshold = 1.0  # no score reaches the large tier
    end = await stack.answer(request)
    assert (end.model, end.cost.estimated) == ("sim-small", True)
    assert port.sent == ["WARM", "FINAL"], port.sent
    assert _degraded(stack.registry) == {}, _degraded(stack.registry)
    assert any("r-next" in w and "'sim-small'" in w for w in _warnings(caplog)), caplog.text
    before = await stack.totals()
    caplog.clear()
    for _ in range(3):
        assert await stack.outbox.flush() == 0
    assert port.sent[2:] == ["WARM", "FINAL"] * 3, port.sent  # kept each round
    assert (dropped, stack.outbox.pending) == ([], 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    kept = [w for w in _warnings(caplog) if "kept for the next try" in w]
    assert len(kept) == 1, kept  # throttled: one line for the three rounds
    assert "'sim-small'" in kept[0] and "model table" in kept[0], kept
    assert await stack.totals() == before  # nothing billed yet
    port.deployed = True
    assert await stack.outbox.flush() == 1
    assert (dropped, stack.outbox.pending) == ([], 0)
    billed = await stack.totals()
    assert billed["requests"] - before["requests"] == 1  # billed once
    assert billed["cost_nanos"] > before["cost_nanos"]
    assert await stack.outbox.flush() == 0  # nothing left: no second bill
    assert await stack.totals() == billed


class LackingPort(TwoTablesPort):
    """Every prefix-cache call (Plan, WARM, FINAL) reaches the replica whose table lacks the
    model the request names (the router's table has it: a rolling deploy)."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        try:
            return await (self.api if self.deployed else self.lacking).plan(request)
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message, mark=exc.mark) from exc

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.sent.append(pc.CommitPhase.Name(request.phase).removeprefix("COMMIT_PHASE_"))
        try:
            return await (self.api if self.deployed else self.lacking).commit(request)
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message, mark=exc.mark) from exc


async def test_a_request_naming_a_model_the_prefix_cache_replica_lacks_is_still_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request naming ``sim-small`` (the router's table has it) whose Plan and WARM reach a
    prefix-cache replica whose table lacks it: refused FAILED_PRECONDITION (the replica's
    table, not the caller's request), so the answer is served, at the router's estimate,
    prefix-cache counted as degraded for it (``reason="FAILED_PRECONDITION"``: it could not
    serve the request), the WARM not taken so no FINAL sent, the bill in the outbox, whose
    replay, refused so again, keeps it until a replica with the model takes it: billed once.
    Before: the Plan's INVALID_ARGUMENT "model 'sim-small' is not a known model" was taken as
    the caller's fault and failed the caller's request (1 of 1); then the replay dropped the
    bill at its first round (never billed)."""
    caplog.set_level(logging.INFO)
    stack = Stack(tmp_path / "unused")
    port = LackingPort(stack.clock, lacks="sim-small")
    stack.port = port
    await stack.warm_earlier()
    port.sent.clear()
    dropped: list[int] = []
    stack.outbox = BillingOutbox(
        port, Journal(tmp_path / "router"), 1.0, 0.01, dropped=dropped.append
    )
    request = _ask("And rule 2?", "r-next")
    request.model = "sim-small"
    end = await stack.answer(request)
    assert (end.model, end.cost.estimated) == ("sim-small", True)
    assert port.sent == ["WARM"], port.sent  # the FINAL waits behind its WARM in the outbox
    assert _degraded(stack.registry) == {"FAILED_PRECONDITION": 2}, _degraded(stack.registry)
    assert any("'sim-small'" in w and "model table" in w for w in _warnings(caplog))
    before = await stack.totals()
    for _ in range(3):
        assert await stack.outbox.flush() == 0
    assert port.sent[1:] == ["WARM"] * 3, port.sent  # kept each round
    assert (dropped, stack.outbox.pending) == ([], 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    port.deployed = True
    assert await stack.outbox.flush() == 1
    assert port.sent[4:] == ["WARM", "FINAL"], port.sent
    assert (dropped, stack.outbox.pending) == ([], 0)
    billed = await stack.totals()
    assert billed["requests"] - before["requests"] == 1  # billed once


class WarmLackingPort(TwoTablesPort):
    """The Plan reaches the replica with the model (a ``plan_id``), every commit the one whose
    table lacks it."""

    def __init__(self, clock: ManualClock, lacks: str) -> None:
        super().__init__(clock, lacks, plans=True)
        self.plan_ids: list[str] = []  # each commit's, as sent

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.sent.append(pc.CommitPhase.Name(request.phase).removeprefix("COMMIT_PHASE_"))
        self.plan_ids.append(request.plan_id)
        try:
            return await (self.api if self.deployed else self.lacking).commit(request)
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message, mark=exc.mark) from exc


async def test_a_warm_with_its_plan_refused_for_the_table_is_not_sent_again_with_the_request(
    tmp_path: Path,
) -> None:
    """A WARM carrying its Plan's ``plan_id`` refused FAILED_PRECONDITION marked
    ``table-lacks-model``: not the plan gone, so not sent again with the whole request (it
    would be refused alike): one WARM, one degradation, the bill in the outbox, billed once a
    replica with the model takes it. Before, any FAILED_PRECONDITION was read as the plan
    gone: a second WARM carrying the request, refused again (2 WARMs sent)."""
    stack = Stack(tmp_path / "unused")
    port = WarmLackingPort(stack.clock, lacks="sim-small")
    stack.port = port
    await stack.warm_earlier()
    port.sent.clear()
    stack.outbox = BillingOutbox(port, Journal(tmp_path / "router"), 1.0, 0.01)
    request = _ask("And rule 2?", "r-next")
    request.model = "sim-small"
    end = await stack.answer(request)
    assert (end.model, end.cost.estimated) == ("sim-small", True)
    assert port.plan_ids[0], port.plan_ids  # the WARM named its Plan
    assert port.sent == ["WARM"], port.sent
    assert _degraded(stack.registry) == {"FAILED_PRECONDITION": 1}, _degraded(stack.registry)
    before = await stack.totals()
    port.deployed = True
    assert await stack.outbox.flush() == 1
    assert (await stack.totals())["requests"] - before["requests"] == 1
