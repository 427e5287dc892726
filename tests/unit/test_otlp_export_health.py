"""A collector that does not take spans is said once an outage, in each service's log, not a
line for each try of each export and each span dropped (the SDK's own lines, which a service
wrote about 14 times in 45 s with its collector down, and once for every span dropped at a
full queue, on the thread that ended it); and once when it takes spans again. Real gRPC: the
exporter against a closed port, a receiver that never answers, then a real receiver."""

from __future__ import annotations

import logging
import socket

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.otlp_wire import WireSpanExporter
from services.common.telemetry import _BatchSpans
from services.tools.stack.otlp_sink import OtlpSink
from tests.black_hole import BlackHole

SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk._shared_internal",
)


def _spans(n: int) -> tuple[ReadableSpan, ...]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for i in range(n):
        provider.get_tracer("t").start_span(f"call {i}").end()
    return memory.get_finished_spans()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _lines(caplog: pytest.LogCaptureFixture, logger: str, words: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and words in r.getMessage()]


def test_a_collector_down_is_said_once_then_once_when_it_takes_spans_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = _closed_port()
    # a one-second budget: the first try's UNAVAILABLE, no time for a retry's backoff
    exporter = WireSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=1)
    sink: OtlpSink | None = None
    try:
        spans = _spans(3)
        results = [exporter.export(spans) for _ in range(4)]
        assert results == [SpanExportResult.FAILURE] * 4
        down = _lines(caplog, "services.common.otlp_wire", "does not take spans")
        assert len(down) == 1 and "UNAVAILABLE" in down[0] and str(port) in down[0], down
        for name in SDK_LOGGERS:  # the SDK's line a try: none reached the handlers
            assert not _lines(caplog, name), _lines(caplog, name)
        sink = OtlpSink(port=port)  # a collector on that port now
        sink.start()
        exporter._timeout = 30  # the channel's reconnect backoff: time to reach the receiver
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        again = _lines(caplog, "services.common.otlp_wire", "takes spans again")
        assert again == [
            f"tracing: the collector at http://127.0.0.1:{port} takes spans again; dropped "
            "meanwhile: 12 spans in 4 exports it did not take, 0 at a full queue"
        ]
        assert sum(sink.counts().values()) == 6  # the two exports taken, 3 spans each
        assert len(_lines(caplog, "services.common.otlp_wire")) == 2
    finally:
        exporter.shutdown(timeout_millis=0)
        if sink is not None:
            sink.stop()


def test_spans_dropped_at_a_full_queue_are_said_once_not_a_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # whatever level a test before set
    hole = BlackHole()
    exporter = WireSpanExporter(endpoint=hole.endpoint, insecure=True, timeout=1)
    # the worker holds a batch of 2 in an export the collector never answers; 2 more wait
    processor = _BatchSpans(exporter, exporter.health, max_queue_size=2, max_export_batch_size=2)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    try:
        for i in range(40):
            provider.get_tracer("t").start_span(f"call {i}").end()
        full = _lines(caplog, "services.common.otlp_wire", "span queue is full")
        assert len(full) == 1 and hole.endpoint in full[0], full
        for name in SDK_LOGGERS:
            assert not _lines(caplog, name), _lines(caplog, name)[:3]
        # every span dropped counted (of 40, at most 4 held: the worker's batch and the
        # queue), not one a 20 s as the SDK's own filter passes its lines
        assert exporter.health.dropped_spans >= 30  # (a second batch, were the loop slow)
    finally:
        provider.shutdown()
        hole.close()


def test_the_export_a_stop_cuts_writes_no_line_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stop closes the channel of an export a hung collector holds: the SDK's ERROR line
    for it ("Failed to export ... CANCELLED"), once in each service's log at every stop with
    its collector hung, is not written; the stop's own line says what was dropped."""
    caplog.set_level(logging.INFO)
    hole = BlackHole()
    exporter = WireSpanExporter(endpoint=hole.endpoint, insecure=True, timeout=600)
    processor = _BatchSpans(exporter, exporter.health, schedule_delay_millis=10)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    try:
        provider.get_tracer("t").start_span("held").end()
        assert hole.accepted.wait(30)  # the export is on its way to the collector
        provider.shutdown()  # gives up on it (TRACING_STOP_S) and closes the channel
        # the cut export ends on the batch processor's thread (the SDK pinned in
        # constraints.txt): its lines, if any, are written by then
        processor._batch_processor._worker_thread.join(30)
        assert not processor._batch_processor._worker_thread.is_alive()
        failed = _lines(caplog, SDK_LOGGERS[0], "Failed to export")
        assert not failed, failed
        assert _lines(caplog, "cachemesh.telemetry", "did not take the last spans")
    finally:
        hole.close()
