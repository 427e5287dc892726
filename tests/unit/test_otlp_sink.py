"""The OTLP receiver the integration tests and ``make bench`` export to: a real TraceService."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.tools.stack.otlp_sink import OtlpSink


def _export(endpoint: str, service: str, spans: int) -> None:
    resource = resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))
        ]
    )
    scope = trace_pb2.ScopeSpans(
        spans=[
            trace_pb2.Span(name=f"s{i}", trace_id=bytes(16), span_id=bytes([i + 1]) * 8)
            for i in range(spans)
        ]
    )
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(resource=resource, scope_spans=[scope])]
    )
    with grpc.insecure_channel(endpoint.removeprefix("http://")) as channel:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)  # type: ignore[no-untyped-call]


@pytest.fixture(params=[True, False], ids=["keep", "count"])
def sink(request: pytest.FixtureRequest) -> Iterator[OtlpSink]:
    sink = OtlpSink(keep_spans=request.param)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def test_counts_spans_per_service_over_real_otlp_grpc(sink: OtlpSink) -> None:
    _export(sink.endpoint, "router", 3)
    _export(sink.endpoint, "model", 2)
    _export(sink.endpoint, "router", 1)
    assert sink.counts() == {"model": 2, "router": 4}


def test_keeps_spans_for_the_tests_and_only_counts_for_the_bench() -> None:
    keeping, counting = OtlpSink(), OtlpSink(keep_spans=False)
    for sink in (keeping, counting):
        sink.start()
    try:
        for sink in (keeping, counting):
            _export(sink.endpoint, "router", 2)
        assert [s.name for s in keeping.spans_of("0" * 32)] == ["s0", "s1"]
        with pytest.raises(RuntimeError, match="counts spans only"):
            counting.spans_of("0" * 32)
        assert counting.counts() == keeping.counts() == {"router": 2}
    finally:
        for sink in (keeping, counting):
            sink.stop()
