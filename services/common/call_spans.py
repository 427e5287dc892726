"""The span of one gRPC call, made or received, at a fraction of the SDK span's cost.

An SDK span is built for any use: a lock, bounded attributes with a lock of their own and
every value checked, bounded lists for events and links, the sampler's result and the
tracer's own metrics, a copy of itself made when it ends. On an exact L1 hit the router's
Lookup span did all of that for four attributes it writes itself, and its Gateway span for
the sixteen the pipeline writes (a CLIENT span's start and end: 22.8 us of the event loop's
CPU with the SDK's span, 10.9 us as a ``CallSpan``). ``CallSpan`` is that span with only what
a call's span does: sampled by the tracer's own sampler, ids from its generator, the
tracer's resource and scope; attributes (a list kept as a tuple, as the SDK keeps it), a
status, events and links kept as given; at its end it is itself the finished
span handed to the tracer's span processor (``ReadableSpan``), as the SDK's would be.

What it does not do, which no call span of this project needs: the span processors'
``on_start`` (the provider's only processor, ``telemetry._BatchSpans``, reads a span at its
end), the SDK's span limits and its check of each attribute's value (the attributes are
this project's own, a few dozen at most; one the exporter cannot encode is logged and left
out by ``otlp_wire``, as the SDK would have left it out) and its internal metrics (off unless
``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, Tracer
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes, AttributeValue


class CallSpan(ReadableSpan, trace.Span):
    """A recording span of one call; ``end`` hands it to ``tracer``'s span processor."""

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: trace.SpanContext,
        parent: trace.SpanContext | None,
        attributes: Mapping[str, AttributeValue],
        kind: SpanKind = SpanKind.CLIENT,
    ) -> None:
        super().__init__(
            name=name,
            context=context,
            parent=parent,
            resource=tracer.resource,
            attributes=dict(attributes),
            events=[],
            links=[],
            kind=kind,
            instrumentation_scope=tracer._instrumentation_scope,
            start_time=time.time_ns(),
        )
        self._processor = tracer.span_processor

    # trace.Span
    def get_span_context(self) -> trace.SpanContext:
        assert self._context is not None
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is not None:
            return
        if type(value) is list:
            value = tuple(value)
        self._attributes[key] = value  # type: ignore[index]

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is None:
            self._events.append(Event(name, attributes, timestamp))  # type: ignore[attr-defined]

    def add_link(self, context: trace.SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links.append(Link(context, attributes))  # type: ignore[attr-defined]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's: OK is final, UNSET is never set."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """As the SDK's: an ``exception`` event."""
        module, name = type(exception).__module__, type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{name}" if module and module != "builtins" else name,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        recorded.update(attributes or {})
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        self._processor.on_end(self)


def start_call_span(
    tracer: trace.Tracer,
    name: str,
    attributes: Mapping[str, AttributeValue],
    kind: SpanKind = SpanKind.CLIENT,
    parent_context: otel_context.Context | None = None,
) -> trace.Span:
    """A span of one call (CLIENT: made; SERVER: received), child of the span current in
    ``parent_context`` (None: the current context): a ``CallSpan`` when ``tracer`` is the
    SDK's, else whatever ``tracer`` starts (a no-op tracer's in a unit test)."""
    if not isinstance(tracer, Tracer):
        return tracer.start_span(name, parent_context, kind, attributes)
    parent = trace.get_current_span(parent_context).get_span_context()
    valid = parent.is_valid
    generator = tracer.id_generator
    trace_id = parent.trace_id if valid else generator.generate_trace_id()
    links: Sequence[Link] = ()
    sampled = tracer.sampler.should_sample(parent_context, trace_id, name, kind, attributes, links)
    decision = sampled.decision
    flags = trace.TraceFlags.SAMPLED if decision is Decision.RECORD_AND_SAMPLE else 0
    if parent.trace_flags.random_trace_id if valid else generator.is_trace_id_random():
        flags |= trace.TraceFlags.RANDOM_TRACE_ID
    context = trace.SpanContext(
        trace_id,
        generator.generate_span_id(),
        is_remote=False,
        trace_flags=trace.TraceFlags(flags),
        trace_state=sampled.trace_state,
    )
    if decision is Decision.DROP:
        return trace.NonRecordingSpan(context)
    return CallSpan(
        tracer, name, context, parent if valid else None, sampled.attributes or {}, kind
    )
