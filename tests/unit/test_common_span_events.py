"""record_event: on the request's span while it lasts, on a span of its own under it after."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from services.common.span_events import record_event

ATTRS = {"dependency": "limits", "error": "ConnectionError"}


def _traced() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return provider.get_tracer("test"), exported


def test_an_event_goes_on_the_current_span_while_it_lasts() -> None:
    tracer, exported = _traced()
    with tracer.start_as_current_span("request"):
        record_event(tracer, "cachemesh.degraded", ATTRS)
    (span,) = exported.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("cachemesh.degraded", ATTRS)
    ]


def test_after_the_span_ended_the_event_gets_a_span_of_its_own_under_it() -> None:
    tracer, exported = _traced()
    with tracer.start_as_current_span("request") as request:
        pass  # ended: what follows runs past the request, in its context
    with trace.use_span(request, end_on_exit=False):
        record_event(tracer, "cachemesh.degraded", ATTRS)
    first, late = exported.get_finished_spans()
    assert first.name == "request" and not first.events
    assert late.name == "cachemesh.degraded"
    assert late.parent is not None and late.parent.span_id == request.get_span_context().span_id
    assert [(e.name, dict(e.attributes or {})) for e in late.events] == [
        ("cachemesh.degraded", ATTRS)
    ]


def test_an_untraced_request_records_nothing() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request"):
        record_event(tracer, "cachemesh.degraded", ATTRS)
    record_event(tracer, "cachemesh.degraded", ATTRS)  # no span at all
    assert not exported.get_finished_spans()
