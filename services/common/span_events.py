"""Events on the request's span, including from work that outlives the request.

A Store after the answer, a bill settled in the background or a limit counted after the
reply runs in the request's trace context, but the request's span has ended by then, and the
SDK drops an event added to an ended span. ``record_event`` puts such an event on a short span
of its own, named after it, under the ended one, so it stays in the request's trace.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.util.types import Attributes


def record_event(tracer: trace.Tracer | None, name: str, attributes: Attributes = None) -> None:
    """``name`` on the current span, or on a span of its own under it once it has ended
    (``tracer`` None: dropped then). Nothing when the request is not traced (its span was
    never sampled)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)
    elif tracer is not None and span.get_span_context().trace_flags.sampled:
        late = tracer.start_span(name)  # the current (ended) span is its parent
        late.add_event(name, attributes)
        late.end()
