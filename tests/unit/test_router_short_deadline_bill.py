"""A whole answer's bill is made by prefix-cache under the router's own timeout, not the outbox.

A complete answer's FINAL was sent under what was left of its caller's deadline (half of it):
an answer that came with little left (10 ms) gave its FINAL 5 ms, which a prefix-cache taking
30 ms could not answer, so the bill went to the billing outbox at the router's estimate at base
prices (the budgets counted the estimate, the replay corrected it a second later, the
corrections counter moved). The FINAL now goes under ``ROUTER_PREFIX_TIMEOUT_S`` (the bill of a
call cut by its caller's deadline does too: ``test_router_deadline_cut_bill``); the answer waits
for it no longer than before (that share of the caller's deadline), and when it must go first
it goes at the estimate, marked so, and its bill (prefix-cache's) follows (``late_bill``):
the limits, the cost counters and the access line count that bill, and the answer's open
call, rewritten with its whole output before the answer goes, covers a router killed meanwhile.

Figures (20 answers, each with 10 ms of its 1 s deadline left, prefix-cache's FINAL taking
30 ms): before, 20 of 20 bills kept in the outbox at the estimate; after, 0 (20 FINALs made by
prefix-cache). Through the Gateway, one answer: the day's and month's spend, the cost counters,
the access line's cost_nanos and cost_estimated, before 330,000 / 165,000 / 165,000 / true
(until a replay corrects them), after 246 / 123 / 123 / false, no correction counted. Its trace
(the ``chat`` span, the request's span) carried the estimate, 165,000, too; now the bill, 123.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common import rpc_tracing
from services.common.clock import ManualClock
from services.common.errors import Code
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.router.calls import PrefixWindow
from services.router.dependencies import CallFailed, Dependencies
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY, FakeContext
from tests.unit.test_router_deadline_cut_bill import _cost_sum
from tests.unit.test_router_open_calls import _restarted
from tests.unit.test_router_pipeline import (
    TABLE,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeStream,
    Rig,
    _answer,
    _settings,
)
from tests.unit.test_router_pipeline import _request as _one_request
from tests.unit.test_router_unanswered_trace import NAMES, USAGE
from tests.unit.test_service_metrics import (
    logs,  # noqa: F401 (a fixture)
    value,
)

# how long prefix-cache takes to answer a FINAL, and what the caller's deadline leaves once the
# answer is whole (the FINAL was given half of it)
_FINAL_TAKES_S = 0.030
_LEFT_S = 0.010
_ANSWERS = 20


@dataclass
class SlowFinals(FakePrefix):
    """A FINAL takes ``takes_s`` (real time), or with ``held`` until the test sets it; given
    less, it times out at its deadline as gRPC's would.

    ``held`` is for a test that needs the answer to go before its FINAL's reply: a real
    ``takes_s`` races the answer's own real-time waits (its share of the deadline, 5 ms, then
    its journal line's fsync, at most 10 ms), and a loaded machine's event loop, stalled past
    the 30 ms between them, let the FINAL answer first (the answer then carried prefix-cache's
    bill, as it should: 1 run in 10 failed ``cost.estimated`` under a busy CPU)."""

    takes_s: float = _FINAL_TAKES_S
    held: asyncio.Event | None = None

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_FINAL:
            if self.held is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.held.wait(), deadline_s)
                answered = self.held.is_set()
            else:
                await asyncio.sleep(min(deadline_s, self.takes_s))
                answered = deadline_s >= self.takes_s
            if not answered:
                self.commits.append(request)
                raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return await super().commit(request, deadline_s)


class _EndsLate(FakeStream):
    """The answer's end comes once ``at()`` ran (it sets the clock ``left_s`` before the
    request's deadline, or trips prefix-cache's breaker meanwhile)."""

    def __init__(self, chunks: list[model_pb2.GenerateChunk | CallFailed], at: Callable[[], None]):
        super().__init__(chunks)
        self._at = at

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = await super().read()
        if chunk is not None and chunk.WhichOneof("part") == "end":
            self._at()
        return chunk


@dataclass
class LateAnswers(FakeModels):
    """Each answer ends ``left_s`` before the deadline of a request sent at ``sent`` with
    ``time_remaining_s`` of 1 s (the pipeline's margin for its reply is 0.1 s of it)."""

    sent: float = 0.0
    left_s: float = _LEFT_S

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        clock = self.clock
        assert clock is not None

        def at() -> None:
            clock.now = self.sent + 0.9 - self.left_s

        return _EndsLate(_answer(replica), at)


async def _ask(rig: Rig, n: int) -> tuple[pb.CompleteResponse, ...]:
    """The end the caller got, and the answer's end as billed (the same when no bill came
    after it)."""
    models = rig.models
    assert isinstance(models, LateAnswers)
    models.sent = rig.clock.now
    late: list[asyncio.Future[pb.CompleteResponse]] = []
    request = _one_request()
    request.request_id = f"r{n}"
    pipeline = rig.pipeline()
    run = pipeline.run("tenant-a", request, time_remaining_s=1.0, late_bill=late.append)
    chunks = [chunk async for chunk in run]
    sent = chunks[-1].end
    await pipeline.drain()
    billed = await late[0] if late else sent
    rig.clock.now += 10.0
    return sent, billed


async def test_a_whole_answer_with_little_of_its_deadline_left_is_billed_by_prefix_cache() -> None:
    clock = FakeClock()
    rig = Rig(prefix=SlowFinals(), models=LateAnswers(clock=clock), clock=clock)
    outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01)
    rig.outbox = outbox
    answers = [await _ask(rig, n) for n in range(_ANSWERS)]
    kept = outbox.pending
    made = sum(
        1 for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL and c.output_tokens
    )
    estimated = sum(1 for _, billed in answers if billed.cost.estimated)
    # of N answers: billed by the outbox's estimate, and prefix-cache's bills
    assert (kept, estimated) == (0, 0), f"{kept} of {_ANSWERS} kept at an estimate"
    assert all(billed.cost.cost_nanos == 123 for _, billed in answers)
    assert made >= _ANSWERS


async def test_an_answer_whose_final_answers_in_the_callers_time_carries_its_bill() -> None:
    """With the caller's time for it (1 s left: the FINAL had 0.5 s, and takes 30 ms) the
    answer waits for its FINAL, as before: its end is prefix-cache's bill, none comes after."""
    clock = FakeClock()
    rig = Rig(prefix=SlowFinals(), clock=clock)
    rig.outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01)
    late: list[asyncio.Future[pb.CompleteResponse]] = []
    pipeline = rig.pipeline()
    run = pipeline.run("tenant-a", _one_request(), time_remaining_s=2.0, late_bill=late.append)
    end = [chunk async for chunk in run][-1].end
    await pipeline.drain()
    assert (end.cost.cost_nanos, end.cost.estimated, late, rig.outbox.pending) == (
        123,
        False,
        [],
        0,
    )


class _Deadline(FakeContext):
    """A call whose client's deadline leaves 1 s."""

    def time_remaining(self) -> float | None:
        return 1.0


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
async def test_the_limits_cost_counters_and_access_line_count_the_bill_not_the_estimate(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
    method: str,
) -> None:
    """Through the Gateway: the answer goes at the estimate (the caller's deadline leaves it
    no time to wait for its bill), and what the router counts is prefix-cache's bill: the
    tenant's spend, the cost counters (no correction after), the access line."""
    clock = FakeClock()
    rig = Rig(prefix=SlowFinals(), models=LateAnswers(clock=clock), clock=clock)
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    store = MemoryLimitStore()
    limiter = Limiter(
        store,
        UniformPolicies(LimitPolicy(tokens_per_min=60_000, day_budget_nanos=10**12)),
        ManualClock(),
        lambda request: 40,
    )
    outbox = BillingOutbox(
        rig.prefix, None, 2.0, 0.01, cost_corrected=metrics.cost_corrected,
        estimate_kept=limiter.count_estimate, estimate_billed=limiter.reconcile,
    )  # fmt: skip
    rig.outbox = outbox
    pipeline = rig.pipeline()
    out, lines = logs({})
    servicer = gateway_servicer(
        pipeline,
        {KEY: "tenant-a"},
        deployed=["sim-large"],
        answers=IdempotencyTable(ManualClock(), 60, 100),
        limiter=limiter,
        metrics=metrics,
        lines=lines,
    )
    assert isinstance(rig.models, LateAnswers)
    rig.models.sent = clock.now
    context: Any = _Deadline()
    held: rpc_tracing.Held = []  # what the call's span waits for (``ServerTracing``)
    token = otel_context.attach(otel_context.set_value(rpc_tracing._HELD, held))
    try:
        if method == "Complete":
            sent = await servicer.Complete(_one_request(), context)
        else:
            chunks = [chunk async for chunk in servicer.StreamComplete(_one_request(), context)]
            sent = chunks[-1].end
    finally:
        otel_context.detach(token)
    assert sent.cost.estimated  # it went before its bill
    # the call's span waits for the bill, which it then carries
    assert [len(futures) for futures in held] == [0, 1]
    await pipeline.drain()
    await asyncio.sleep(0)  # the callbacks of the bill that came
    await limiter.drain()
    spent = sum(v for (tenant, _), v in store._spent.items() if tenant == "tenant-a")
    (line,) = [json.loads(text) for text in out.getvalue().splitlines() if '"access"' in text]
    counted = (spent, _cost_sum(registry), line["cost_nanos"], line["cost_estimated"])
    assert counted == (2 * 123, 123, 123, False)  # the day's spend and the month's
    assert outbox.pending == 0
    for direction in ("up", "down"):
        labels = {"tenant": "tenant-a", "direction": direction}
        assert not registry.get_sample_value(
            "cachemesh_router_cost_corrections_nanos_total", labels
        )


async def test_an_answer_gone_before_its_bill_is_journalled_whole(tmp_path: Path) -> None:
    """A router killed after the answer went at its estimate, before its FINAL's reply: its
    next start bills the answer whole (its open call rewritten with the answer's output
    count before the answer goes, as the outbox kept it before), not the open call's count
    of the answer's first second (0 here)."""
    clock = FakeClock()
    models = LateAnswers(clock=clock, sent=clock.now)
    reply = asyncio.Event()  # the FINAL's: never before the router is killed
    prefix = SlowFinals(held=reply)
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01)
    rig = Rig(prefix=prefix, models=models, clock=clock, outbox=outbox)
    pipeline = rig.pipeline()
    run = pipeline.run("tenant-a", _one_request(), time_remaining_s=1.0)
    async with contextlib.aclosing(run) as chunks:
        async for chunk in chunks:
            if chunk.WhichOneof("part") == "end":
                assert chunk.end.cost.estimated
                # the router is killed now: its FINAL sent, not answered
                journal = _restarted(tmp_path / "data", tmp_path / "restarted")
    reply.set()
    await pipeline.drain()  # (the test's own router)
    again = FakePrefix()
    restarted = BillingOutbox(again, journal, 1.0, 0.01)
    assert await restarted.flush() == 1
    finals = [c.output_tokens for c in again.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert finals == [chunk.end.usage.output_tokens] == [3]
    journal.close()


def test_the_check_before_a_final_leaves_the_breakers_trial_to_the_final() -> None:
    """Once prefix-cache's breaker has been open ``ROUTER_PREFIX_BREAKER_S``, its next call is
    the trial. ``_bill_answer`` asks ``prefix_faulted`` before it sends the FINAL, whose own
    check (``_skipped``) asks the breaker again: the first ask took the trial, so the FINAL
    was skipped (no call reached prefix-cache, the breaker tripped another period, each time
    a finishing answer asked first). Before: prefix_faulted False, then the FINAL skipped;
    after: the FINAL is the trial."""
    clock = FakeClock()
    calls = Rig(clock=clock).pipeline()._calls
    breaker = calls._breaker
    for _ in range(3):
        breaker.failed()  # prefix-cache hung: left alone
    assert calls.prefix_faulted(PrefixWindow())  # open: the bill goes to the outbox at once
    clock.now += 3600  # long past ROUTER_PREFIX_BREAKER_S: the next call is the trial
    window = PrefixWindow()
    assert not calls.prefix_faulted(window)  # _bill_answer's check
    assert calls._skipped(window) == ""  # the FINAL's own: it is sent (the trial)
    # and the trial taken, another call meanwhile skips until it reports
    assert calls._skipped(PrefixWindow()) != ""
    assert calls.prefix_faulted(PrefixWindow())


async def test_a_late_bill_is_on_the_chat_span_the_requests_span_and_the_token_metric() -> None:
    """An answer that went at its estimate: its trace tells its bill as the access line does.
    Before: its ``chat <model>`` span and the request's span kept the estimate (cost_nanos
    165,000, cost_estimated true) while the bill was 123; after: both carry the bill, and say
    it came after the answer; the GenAI token metric counts the billed input (40, not the
    engine's prompt count)."""
    clock = FakeClock()
    rig = Rig(prefix=SlowFinals(), models=LateAnswers(clock=clock), clock=clock)
    rig.outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01)
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    registry = new_registry()
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, rig.replicas)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(
        deps, TABLE, rig.tokenizers, tracer, _settings(), router, clock=clock,
        outbox=rig.outbox, wall=rig.wall, metrics=RouterMetrics(registry, TenantLabels(4)),
    )  # fmt: skip
    assert isinstance(rig.models, LateAnswers)
    rig.models.sent = clock.now
    late: list[asyncio.Future[pb.CompleteResponse]] = []
    root = tracer.start_span("request")  # the Gateway call's, which waits for the late bill
    with trace.use_span(root, end_on_exit=False):
        run = pipeline.run("tenant-a", _one_request(), time_remaining_s=1.0, late_bill=late.append)
        sent = [chunk async for chunk in run][-1].end
    assert sent.cost.estimated  # it went before its bill
    await pipeline.drain()
    billed = await late[0]
    await asyncio.sleep(0)  # the bill's callbacks
    root.end()
    assert (billed.cost.cost_nanos, billed.cost.estimated) == (123, False)
    spans_by_name = {span.name: span for span in exported.get_finished_spans()}
    chat = spans_by_name["chat sim-large"]
    request_span = spans_by_name["request"]
    told = [
        (
            span.attributes["cachemesh.cost_nanos"],
            span.attributes["cachemesh.cost_estimated"],
            span.attributes.get("cachemesh.billed_after_answer"),
        )
        for span in (chat, request_span)
        if span.attributes is not None
    ]
    assert told == [(123, False, True), (123, False, True)]
    assert chat.attributes is not None
    assert chat.attributes["gen_ai.usage.input_tokens"] == billed.usage.input_tokens
    usage = value(registry, USAGE, gen_ai_token_type="input", **NAMES)
    assert usage == billed.usage.input_tokens


async def test_an_answer_gone_before_its_bill_has_its_whole_bill_fsynced_first(
    tmp_path: Path,
) -> None:
    """The open call rewritten with the answer's whole output is fsynced before the answer
    goes at its estimate, as the outbox kept a bill before (a host crash within the journal's
    sync interval lost the bill of an answer delivered). Before: the journal held the line
    unsynced as the answer went (dirty); after: synced. (0.4 s of the deadline left, the FINAL
    answered only after the answer: the fsync has all of the 0.4 s.)"""
    clock = FakeClock()
    models = LateAnswers(clock=clock, sent=clock.now, left_s=0.4)
    assert await _unsynced_at_the_end(tmp_path, clock, models) == [False]


async def test_an_answer_whose_bills_sync_is_slow_goes_within_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait for the line's fsync is bounded by what the caller's deadline leaves (10 ms
    here): a disk taking 0.5 s a sync held the answer, whole and paid for, past its caller's
    deadline (the caller got no end). Before: the answer went with its line synced, after
    the sync; after: it goes with the line in the file, not yet synced, and says so."""
    real_fsync = os.fsync
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_fsync(fd: int) -> None:  # on the journal's thread: until the test lets it end
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        real_fsync(fd)

    Journal(tmp_path / "data").close()  # its directory and file made before the disk is slow
    monkeypatch.setattr(os, "fsync", slow_fsync)  # the journal's thread's
    clock = FakeClock()
    models = LateAnswers(clock=clock, sent=clock.now)
    unsynced = await _unsynced_at_the_end(tmp_path, clock, models, release.set)
    assert unsynced == [True]
    assert "before its bill's journal line was synced" in caplog.text


async def _unsynced_at_the_end(
    tmp_path: Path,
    clock: FakeClock,
    models: LateAnswers,
    then: Callable[[], None] = lambda: None,
) -> list[bool]:
    """One answer through a pipeline whose outbox journals to ``tmp_path``, its FINAL answered
    once the answer went: whether its journal held an unsynced line as each end (at the
    estimate) went; ``then`` runs after the answer, before the FINAL's reply and the drain."""
    reply = asyncio.Event()
    prefix = SlowFinals(held=reply)
    journal = Journal(tmp_path / "data")
    outbox = BillingOutbox(prefix, journal, 1.0, 0.01)
    pipeline = Rig(prefix=prefix, models=models, clock=clock, outbox=outbox).pipeline()
    unsynced: list[bool] = []
    async for chunk in pipeline.run("tenant-a", _one_request(), time_remaining_s=1.0):
        if chunk.WhichOneof("part") == "end":
            assert chunk.end.cost.estimated
            unsynced.append(journal.dirty)
    then()
    reply.set()
    await pipeline.drain()
    await outbox.close()
    return unsynced


async def test_a_finishing_answers_final_is_the_breakers_trial_through_the_pipeline() -> None:
    """The request's WARM reached prefix-cache; during its answer the breaker tripped (other
    requests' calls timed out) and ``ROUTER_PREFIX_BREAKER_S`` passed. ``_bill_answer`` asked
    the breaker through ``prefix_timeout_s`` for the answer's wait, which took the half-open
    trial; the FINAL, asking again, was skipped: 0 FINALs, the bill in the outbox at the
    estimate (165,000), the breaker tripped another period. Now the FINAL is the trial: 1
    FINAL, the bill 123, the breaker closed."""
    clock = FakeClock()
    breakers: list[Any] = []

    @dataclass
    class TripMidAnswer(FakeModels):
        def generate(
            self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
        ) -> FakeStream:
            self.calls.append((replica, request))

            def at() -> None:
                for _ in range(3):
                    breakers[0].failed()  # prefix-cache left alone
                clock.now += 3600  # long past ROUTER_PREFIX_BREAKER_S: the next call is the trial

            return _EndsLate(_answer(replica), at)

    rig = Rig(models=TripMidAnswer(clock=clock), clock=clock)
    rig.outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01)
    pipeline = rig.pipeline()
    breakers.append(pipeline._calls._breaker)
    late: list[asyncio.Future[pb.CompleteResponse]] = []
    run = pipeline.run("tenant-a", _one_request(), time_remaining_s=7200.0, late_bill=late.append)
    chunks = [chunk async for chunk in run]
    await pipeline.drain()
    finals = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert len(finals) == 1 and rig.outbox.pending == 0
    end = chunks[-1].end
    assert not end.cost.estimated
    assert not breakers[0].tripped
