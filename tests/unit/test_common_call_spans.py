"""A call's CLIENT span (``ClientSpans``) is exported as the SDK's span of the call would be,
without building one."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from services.common.call_spans import CallSpan, start_call_span
from services.common.otlp_wire import SpanWire
from services.common.rpc_tracing import ClientSpans, end_call_span, method_attributes

LOOKUP = "/cachemesh.v1.SemanticCache/Lookup"
CREDENTIAL = (("x-cachemesh-internal", "secret"),)


def _provider(sampler: Any = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "router"}), sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _call(provider: TracerProvider, code: grpc.StatusCode, details: str = "") -> dict[str, str]:
    """One call under a SERVER span: the call's metadata."""
    tracer = provider.get_tracer("cachemesh.grpc")
    with tracer.start_as_current_span("/cachemesh.v1.Gateway/Complete", kind=SpanKind.SERVER):
        span, metadata = ClientSpans(tracer, CREDENTIAL).start(LOOKUP)
        end_call_span(span, code, details)
    return dict(metadata)


def _sdks_call(provider: TracerProvider, code: grpc.StatusCode, details: str = "") -> None:
    """The same call's span as the SDK's own span makes it (what ClientSpans did before)."""
    tracer = provider.get_tracer("cachemesh.grpc")
    with tracer.start_as_current_span("/cachemesh.v1.Gateway/Complete", kind=SpanKind.SERVER):
        span = tracer.start_span(LOOKUP, kind=SpanKind.CLIENT, attributes=method_attributes(LOOKUP))
        end_call_span(span, code, details)


def _sampled(metadata: dict[str, str]) -> bool:
    return bool(int(metadata["traceparent"].rpartition("-")[2], 16) & 1)


def _without_ids_and_times(span: ReadableSpan, events: bool = True) -> bytes:
    """The span's OTLP bytes with its ids and times zeroed (they differ from call to call);
    its events too, unless ``events`` is False (their times differ too)."""
    context = span.get_span_context()
    assert context is not None and span.parent is not None
    fixed = ReadableSpan(
        name=span.name,
        context=trace.SpanContext(1, 1, False, context.trace_flags, context.trace_state),
        parent=trace.SpanContext(1, 2, span.parent.is_remote, span.parent.trace_flags),
        resource=span.resource,
        attributes=span.attributes,
        events=span.events if events else (),
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=1,
        end_time=2,
        instrumentation_scope=span.instrumentation_scope,
    )
    return SpanWire().span(fixed)


@pytest.mark.parametrize(
    ("code", "details"),
    [(grpc.StatusCode.OK, ""), (grpc.StatusCode.UNAVAILABLE, "connection refused")],
)
def test_a_calls_span_is_exported_as_the_sdks_span_of_it(
    code: grpc.StatusCode, details: str
) -> None:
    provider, memory = _provider()
    metadata = _call(provider, code, details)
    _sdks_call(provider, code, details)
    ours, server, theirs, _ = memory.get_finished_spans()
    assert _without_ids_and_times(ours) == _without_ids_and_times(theirs)
    # a child of the SERVER span it was made under, carried in the call's metadata
    assert ours.parent is not None and ours.parent.span_id == server.context.span_id
    assert ours.context.trace_id == server.context.trace_id
    assert metadata["traceparent"] == (
        f"00-{ours.context.trace_id:032x}-{ours.context.span_id:016x}-"
        f"{int(ours.context.trace_flags):02x}"
    )
    assert ours.context.trace_flags == theirs.context.trace_flags  # sampled, random id
    assert metadata["x-cachemesh-internal"] == "secret"
    assert ours.start_time is not None and ours.end_time is not None
    assert ours.start_time <= ours.end_time


def test_a_call_builds_no_sdk_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK span's per-span objects (locks, bounded attributes and lists, its copy at the
    end) were most of what tracing cost the router on an exact hit."""
    provider, memory = _provider()
    built: list[str] = []
    init = sdk_trace._Span.__init__

    def counted(self: Any, name: str, *args: Any, **kwargs: Any) -> None:
        built.append(name)
        init(self, name, *args, **kwargs)

    monkeypatch.setattr(sdk_trace._Span, "__init__", counted)
    _call(provider, grpc.StatusCode.OK)
    assert built == ["/cachemesh.v1.Gateway/Complete"]  # the SERVER span's, not the call's
    assert [s.name for s in memory.get_finished_spans()] == [
        LOOKUP,
        "/cachemesh.v1.Gateway/Complete",
    ]


def test_a_call_under_an_unsampled_request_is_not_recorded_and_says_so() -> None:
    provider, memory = _provider(ParentBased(TraceIdRatioBased(0.0)))
    metadata = _call(provider, grpc.StatusCode.OK)
    assert memory.get_finished_spans() == ()
    assert not _sampled(metadata)  # the next service records nothing either


def test_a_call_outside_any_request_starts_a_trace_of_its_own() -> None:
    provider, memory = _provider()
    span, sent = ClientSpans(provider.get_tracer("t")).start(LOOKUP)
    end_call_span(span, grpc.StatusCode.OK)
    (ours,) = memory.get_finished_spans()
    assert ours.parent is None and ours.context.trace_id != 0
    metadata = dict(sent)
    assert _sampled(metadata) and metadata["traceparent"].startswith(
        f"00-{ours.context.trace_id:032x}-"
    )


def test_with_tracing_off_a_call_still_carries_the_requests_context() -> None:
    provider, memory = _provider(ALWAYS_OFF)
    metadata = _call(provider, grpc.StatusCode.OK)
    assert memory.get_finished_spans() == ()
    assert not _sampled(metadata)


def test_an_ended_call_span_takes_nothing_more() -> None:
    provider, memory = _provider()
    span, _ = ClientSpans(provider.get_tracer("t")).start(LOOKUP)
    end_call_span(span, grpc.StatusCode.OK)
    span.set_attribute("late", 1)
    span.add_event("late")
    span.set_status(trace.Status(trace.StatusCode.ERROR, "late"))
    span.end()  # a second end exports nothing more
    (ours,) = memory.get_finished_spans()
    assert "late" not in (ours.attributes or {}) and not ours.events
    assert ours.status.status_code is trace.StatusCode.UNSET


ROOT_ATTRIBUTES: dict[str, Any] = {
    "cachemesh.tenant": "tenant-a",
    "cachemesh.cost_nanos": 0,
    "cachemesh.similarity": 0.93,
    "cachemesh.semantic_exact": True,
    "cachemesh.replicas_ejected": ["a", "b"],
}


def test_a_received_calls_span_is_exported_as_the_sdks_span_of_it() -> None:
    """A SERVER span under the caller's (remote) span, written on by the handler: events,
    links, a list attribute, a None one (kept, as the SDK keeps it: the encoder leaves it
    out), an error status, an OK over it."""
    provider, memory = _provider()
    tracer = provider.get_tracer("cachemesh.grpc")
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    parent = propagate.extract(carrier)
    linked = trace.SpanContext(0x1234, 0x5678, is_remote=True)
    method = "/cachemesh.v1.Gateway/Complete"
    attributes = method_attributes(method)
    for span in (
        start_call_span(tracer, method, attributes, SpanKind.SERVER, parent),
        tracer.start_span(method, parent, SpanKind.SERVER, attributes),
    ):
        span.set_attributes(ROOT_ATTRIBUTES)
        span.set_attribute("cachemesh.nothing", None)
        span.add_event("cachemesh.replica_retry", {"replica": "m1"})
        span.add_link(linked, {"cachemesh.link": "replayed_from"})
        span.set_status(trace.Status(trace.StatusCode.ERROR, "UNAVAILABLE"))
        span.set_status(trace.Status(trace.StatusCode.OK))
        span.end()
    ours, theirs = memory.get_finished_spans()
    assert isinstance(ours, CallSpan)
    assert ours.parent is not None and ours.parent.is_remote
    assert ours.parent.span_id == 0xB7AD6B7169203331
    assert ours.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert ours.attributes is not None
    assert ours.attributes["cachemesh.replicas_ejected"] == ("a", "b")
    assert [e.timestamp is not None for e in ours.events] == [True]
    assert _without_ids_and_times(ours, events=False) == _without_ids_and_times(
        theirs, events=False
    )
    assert [(e.name, dict(e.attributes or {})) for e in ours.events] == [
        (e.name, dict(e.attributes or {})) for e in theirs.events
    ]
