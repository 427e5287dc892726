"""A request is traced whatever its caller's ``traceparent`` says about sampling.

The router's Gateway and the HTTP front are where callers outside cachemesh come in. With
the SDK's default sampler (parent-based), a caller whose ``traceparent`` said "not sampled"
(an application sampling its own traces at 10%: 90% of its requests) had none of its
requests' spans recorded, in any service: measured on a ``make up`` stack exporting to an
OTLP receiver, the same request made 10 spans with ``-01`` and 0 with ``-00``, though its
response, access line and logs named a trace id. A SERVER span at those two is now recorded
in the caller's trace; every other span still follows its parent, so the services behind
the router follow the router's decision and a try the router sends unsampled on purpose
(the billing outbox's) stays unsampled. An ``OTEL_TRACES_SAMPLER`` of the operator's is
applied as it says.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from services.common.call_spans import start_call_span
from services.common.telemetry import build_tracer_provider

CALLER_TRACE, CALLER_SPAN = 0xABAB << 100, 0xCDCD << 40


def _caller(sampled: bool) -> trace.Span:
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else 0)
    return trace.NonRecordingSpan(trace.SpanContext(CALLER_TRACE, CALLER_SPAN, True, flags))


@pytest.fixture
def providers() -> Iterator[list[TracerProvider]]:
    made: list[TracerProvider] = []
    yield made
    for provider in made:
        provider.shutdown()


def _provider(
    made: list[TracerProvider], edge: bool, environ: dict[str, str] | None = None
) -> TracerProvider:
    # console: otlp's shutdown would wait on a receiver that is not there
    provider = build_tracer_provider(
        {"OTEL_TRACES_EXPORTER": "console", **(environ or {})}, "router", edge=edge
    )
    made.append(provider)
    return provider


def _received(provider: TracerProvider, sampled: bool) -> trace.Span:
    """A call received from a caller whose traceparent says ``sampled``, as ``rpc_tracing``
    and the HTTP front start its span."""
    parent = trace.set_span_in_context(_caller(sampled))
    return start_call_span(provider.get_tracer("t"), "call", {}, SpanKind.SERVER, parent)


def test_a_request_whose_caller_does_not_sample_is_still_traced_at_the_edge(
    providers: list[TracerProvider],
) -> None:
    edge = _provider(providers, edge=True)
    span = _received(edge, sampled=False)
    assert span.is_recording() and span.get_span_context().trace_flags.sampled
    # in the caller's trace, under the caller's span
    assert span.get_span_context().trace_id == CALLER_TRACE
    parent = getattr(span, "parent", None)
    assert parent is not None and parent.span_id == CALLER_SPAN
    # the calls it makes carry the decision: the services behind record theirs
    with trace.use_span(span):
        inner = start_call_span(edge.get_tracer("t"), "Lookup", {})
    assert inner.is_recording() and inner.get_span_context().trace_flags.sampled is True


def test_behind_the_edge_and_for_the_routers_own_unsampled_tries_the_parent_decides(
    providers: list[TracerProvider],
) -> None:
    internal = _provider(providers, edge=False)
    assert not _received(internal, sampled=False).is_recording()
    assert _received(internal, sampled=True).is_recording()
    edge = _provider(providers, edge=True)
    unsampled = trace.set_span_in_context(_caller(sampled=False))  # the outbox's tries
    for kind in (SpanKind.CLIENT, SpanKind.INTERNAL):
        made = start_call_span(edge.get_tracer("t"), "Commit", {}, kind, unsampled)
        assert not made.is_recording()


def test_an_operators_sampler_is_applied_as_it_says(
    providers: list[TracerProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    honouring = _provider(providers, True, {"OTEL_TRACES_SAMPLER": "parentbased_always_on"})
    assert not _received(honouring, sampled=False).is_recording()
