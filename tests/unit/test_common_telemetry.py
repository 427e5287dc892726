"""The tracer provider from the OTEL_* variables: spans are recorded only when they leave."""

from __future__ import annotations

import pytest
from opentelemetry.trace import format_trace_id

from services.common.env import ConfigError
from services.common.telemetry import build_tracer_provider


@pytest.mark.parametrize(
    "environ",
    [{"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}],
)
def test_with_no_exporter_no_span_is_recorded_but_the_trace_id_still_flows(
    environ: dict[str, str],
) -> None:
    tracer = build_tracer_provider(environ, "router").get_tracer("t")
    span = tracer.start_span("call")
    context = span.get_span_context()
    assert not span.is_recording()  # nothing would ever read it
    assert context.is_valid and format_trace_id(context.trace_id) != "0" * 32
    assert not context.trace_flags.sampled  # the next service records nothing either


def test_with_an_exporter_every_span_is_recorded() -> None:
    # console: otlp's shutdown would wait on a receiver that is not there
    provider = build_tracer_provider({"OTEL_TRACES_EXPORTER": "console"}, "router")
    try:
        span = provider.get_tracer("t").start_span("call")
        assert span.is_recording() and span.get_span_context().trace_flags.sampled
        span.end()
    finally:
        provider.shutdown()


def test_an_unknown_exporter_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER must be one of"):
        build_tracer_provider({"OTEL_TRACES_EXPORTER": "zipkin"}, "router")
