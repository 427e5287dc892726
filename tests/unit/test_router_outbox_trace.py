"""A replayed bill joins the trace of the request it bills: the outbox keeps each entry's trace
context (in the journal, so also across a restart) and sends its commits under one
``cachemesh.billing_replay`` span, a child of the request's span. An entry journalled before
the context was kept still loads and is billed, under a root span."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import JOURNAL_NAME, Journal
from tests.unit.test_router_outbox import FakePrefix, _commits


class TracedPrefix(FakePrefix):
    """Notes the span each commit was sent under."""

    def __init__(self) -> None:
        super().__init__()
        self.under: list[trace.SpanContext] = []

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.under.append(trace.get_current_span().get_span_context())
        return await super().commit(request, deadline_s)


def _tracing() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return provider.get_tracer("test"), exported


async def _kept_then_down(tracer: trace.Tracer, outbox: BillingOutbox, rounds: int) -> trace.Span:
    """A request's bill kept while prefix-cache is down, then ``rounds`` flushes that reach
    nothing; the request's span."""
    with tracer.start_as_current_span("Complete") as request:
        await outbox.keep(_commits("a#1"))
    for _ in range(rounds):
        assert await outbox.flush() == 0
    return request


def _replays(exported: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exported.get_finished_spans() if s.name == "cachemesh.billing_replay"]


async def test_a_bill_replayed_after_a_restart_is_in_the_requests_trace(tmp_path: Path) -> None:
    tracer, exported = _tracing()
    prefix = TracedPrefix()
    first = Journal(tmp_path)
    outbox = BillingOutbox(prefix, first, 1.0, 0.01, tracer)
    with tracer.start_as_current_span("Complete") as request:
        await outbox.keep(_commits("a#1"))
    first.close()  # the router dies; the next one replays its journal
    journal = Journal(tmp_path)
    again = BillingOutbox(prefix, journal, 1.0, 0.01, tracer)
    prefix.down = False
    assert await again.flush() == 1
    journal.close()
    (replay,) = _replays(exported)
    asked = request.get_span_context()
    assert replay.parent is not None and replay.parent.span_id == asked.span_id
    assert replay.context is not None and replay.context.trace_id == asked.trace_id
    assert replay.attributes is not None and replay.attributes["cachemesh.outcome"] == "settled"
    # both commits went out under the replay's span (their client spans are its children)
    assert [c.span_id for c in prefix.under[-2:]] == [replay.context.span_id] * 2


async def test_an_in_memory_outbox_replays_in_the_requests_trace_too() -> None:
    tracer, exported = _tracing()
    prefix = TracedPrefix()
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, tracer)
    with tracer.start_as_current_span("Complete") as request:
        await outbox.keep(_commits("a#1"))
    prefix.down = False
    assert await outbox.flush() == 1
    (replay,) = _replays(exported)
    assert replay.parent is not None
    assert replay.parent.span_id == request.get_span_context().span_id


async def test_an_entry_journalled_without_a_trace_context_is_billed_under_a_root_span(
    tmp_path: Path,
) -> None:
    raw = [base64.b64encode(c.SerializeToString()).decode() for c in _commits("old#1")]
    (tmp_path / JOURNAL_NAME).write_text(json.dumps({"add": "e1", "commits": raw}) + "\n")
    tracer, exported = _tracing()
    prefix = TracedPrefix()
    prefix.down = False
    journal = Journal(tmp_path)
    assert await BillingOutbox(prefix, journal, 1.0, 0.01, tracer).flush() == 1
    journal.close()
    assert [key for key, _ in prefix.sent] == ["old#1", "old#1"]
    (replay,) = _replays(exported)
    assert replay.parent is None


class ServingPrefix(TracedPrefix):
    """Answers its health check as prefix-cache does: SERVING when it takes commits (or
    ``says_serving`` whatever it does), noting each check's deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.says_serving: bool | None = None
        self.checked: list[float] = []

    async def serving(self, deadline_s: float) -> bool:
        self.checked.append(deadline_s)
        return not self.down if self.says_serving is None else self.says_serving


async def test_an_outage_adds_two_spans_and_the_try_that_bills_is_in_the_requests_trace() -> None:
    """prefix-cache down: the outbox tries its oldest entry every ROUTER_OUTBOX_RETRY_S, and
    each try was a replay span and a Commit client span in that request's trace (a 20 s outage:
    60 spans; an hour: ~7,200). The first unreachable try is recorded; the next rounds ask
    prefix-cache's health, send nothing while it does not say SERVING, and the try once it
    does is recorded, with how many rounds found it unreachable. Before, each try after the
    first was sent unsampled, the one that billed too: its WARM and FINAL were in no trace,
    and prefix-cache logged them under a span id no exported span has."""
    tracer, exported = _tracing()
    prefix = ServingPrefix()
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, tracer, prefix_serving=prefix.serving)
    request = await _kept_then_down(tracer, outbox, 20)
    assert len(_replays(exported)) == 1  # 20 rounds down: the first try's span only
    prefix.down = False
    assert await outbox.flush() == 1
    first, last = _replays(exported)
    asked = request.get_span_context()
    for replay in (first, last):
        assert replay.parent is not None and replay.parent.span_id == asked.span_id
        assert replay.context is not None and replay.context.trace_id == asked.trace_id
    assert first.attributes is not None and last.attributes is not None
    assert first.attributes["cachemesh.outcome"] == "unreachable"
    assert last.attributes["cachemesh.outcome"] == "settled"
    assert last.attributes["cachemesh.unreachable_rounds"] == 20
    assert "cachemesh.unreachable_rounds" not in first.attributes
    # the first try's WARM, then the WARM and FINAL that billed, each under its replay span
    # (their client spans, and prefix-cache's, are its children): the rounds between sent
    # nothing, asked its health within the commits' deadline
    assert first.context is not None and last.context is not None
    assert [(c.span_id, c.trace_flags.sampled) for c in prefix.under] == [
        (first.context.span_id, True),
        (last.context.span_id, True),
        (last.context.span_id, True),
    ]
    assert prefix.checked == [1.0] * 20


async def test_prefix_cache_saying_serving_while_commits_fail_adds_a_bounded_number_of_spans() -> (
    None
):
    """Its health SERVING but its commits unreachable (its Redis slow, a stale connection):
    the tries after it says so are recorded, three at most, then sent unsampled and its
    health no longer asked; the one that bills is still a replay span counting them."""
    tracer, exported = _tracing()
    prefix = ServingPrefix()
    prefix.says_serving = True
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, tracer, prefix_serving=prefix.serving)
    request = await _kept_then_down(tracer, outbox, 20)
    prefix.down = False
    assert await outbox.flush() == 1
    replays = _replays(exported)
    outcomes = [r.attributes["cachemesh.outcome"] for r in replays if r.attributes is not None]
    assert outcomes == ["unreachable"] * 4 + ["settled"]
    assert len(prefix.under) == 22  # every round sent its WARM; the last, the FINAL too
    assert [c.trace_id for c in prefix.under] == [request.get_span_context().trace_id] * 22
    assert [c.trace_flags.sampled for c in prefix.under] == [True] * 4 + [False] * 18
    assert len(prefix.checked) == 3


async def test_without_a_health_to_ask_the_tries_after_an_unreachable_one_are_unsampled() -> None:
    tracer, exported = _tracing()
    prefix = TracedPrefix()
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, tracer)
    request = await _kept_then_down(tracer, outbox, 5)
    prefix.down = False
    assert await outbox.flush() == 1
    first, last = _replays(exported)
    assert last.attributes is not None and last.attributes["cachemesh.unreachable_rounds"] == 5
    # every try carried the request's trace id (prefix-cache's logs); only the first was sampled
    assert [c.trace_id for c in prefix.under] == [request.get_span_context().trace_id] * 7
    sampled = [c.span_id for c in prefix.under if c.trace_flags.sampled]
    assert first.context is not None and sampled == [first.context.span_id]
