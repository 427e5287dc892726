"""A collector that does not take spans is said once an outage, in each service's log, not a
line for each try of each export and each span dropped (the SDK's own lines, which a service
wrote about 14 times in 45 s with its collector down, and once for every span dropped at a
full queue, on the thread that ended it); and once when it takes spans again. Real gRPC: the
exporter against a closed port, a receiver that never answers, then a real receiver."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._shared_internal import BatchProcessor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import telemetry
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
        # the first try's UNAVAILABLE, or on a loaded machine the budget's end before it: both
        # the one cause "unreachable", said once
        assert len(down) == 1 and str(port) in down[0], down
        assert "UNAVAILABLE" in down[0] or "DEADLINE_EXCEEDED" in down[0], down
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
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
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
        # the stop's bound is not this test's point (test_the_export_a_stop_cuts_... and
        # test_common_telemetry's prove it): the collector never answers, so the stop waited
        # the whole TRACING_STOP_S (2 s) for the export in flight
        monkeypatch.setattr(telemetry, "TRACING_STOP_S", 0.05)
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


class _Refusing:
    """A real gRPC server on ``port`` that answers every OTLP trace export with ``code``
    (a collector that takes the connection and refuses its credentials)."""

    def __init__(self, port: int, code: grpc.StatusCode, details: str) -> None:
        def export(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(code, details)

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((handler,))
        self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(None)


def test_a_new_cause_in_an_outage_is_said_and_a_refusal_at_error_naming_the_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """UNAVAILABLE, then UNAUTHENTICATED ("invalid api key"): the second cause was never said
    (one WARNING naming UNAVAILABLE for all the failures). Said once each as it comes, the
    refusal, which no retry mends, at ERROR pointing at the headers and TLS."""
    caplog.set_level(logging.INFO)
    port = _closed_port()
    exporter = WireSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=1)
    refusing: _Refusing | None = None
    try:
        spans = _spans(2)
        assert [exporter.export(spans) for _ in range(3)] == [SpanExportResult.FAILURE] * 3
        refusing = _Refusing(port, grpc.StatusCode.UNAUTHENTICATED, "invalid api key")
        exporter._timeout = 30  # the channel's reconnect backoff: time to reach the server
        assert [exporter.export(spans) for _ in range(3)] == [SpanExportResult.FAILURE] * 3
        said = [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if r.name == "services.common.otlp_wire"
        ]
        assert len(said) == 2, said
        # UNAVAILABLE, or DEADLINE_EXCEEDED when the retry ran out of the second: one cause
        assert said[0][0] == logging.WARNING and "does not take spans" in said[0][1], said
        level, line = said[1]
        assert level == logging.ERROR, said
        assert "UNAUTHENTICATED: invalid api key" in line and "now; before: " in line, line
        assert "OTEL_EXPORTER_OTLP_(TRACES_)HEADERS" in line, line
        for name in SDK_LOGGERS:
            assert not _lines(caplog, name), _lines(caplog, name)
    finally:
        exporter.shutdown(timeout_millis=0)
        if refusing is not None:
            refusing.stop()


def test_a_failure_without_a_line_of_its_own_is_not_said_as_the_last_exports(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status of an export is its own: one that fails before any try (its encoding
    raised) in a later outage was said with the status of an export of the outage before."""
    caplog.set_level(logging.INFO)
    port = _closed_port()
    exporter = WireSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=1)
    sink = OtlpSink(port=port)
    try:
        spans = _spans(1)
        assert exporter.export(spans) is SpanExportResult.FAILURE  # UNAVAILABLE
        sink.start()
        exporter._timeout = 30
        assert exporter.export(spans) is SpanExportResult.SUCCESS

        def unencodable(data: object) -> object:
            raise ValueError("not encodable")

        monkeypatch.setattr(exporter, "_translate_data", unencodable)
        with pytest.raises(ValueError):
            exporter.export(spans)
        down = _lines(caplog, "services.common.otlp_wire", "does not take spans")
        # the first: UNAVAILABLE, or DEADLINE_EXCEEDED when the retry ran out of the second
        assert len(down) == 2 and "(error;" not in down[0], down
        assert "(error;" in down[1], down
    finally:
        exporter.shutdown(timeout_millis=0)
        sink.stop()


def test_another_exporters_lines_on_a_thread_ours_used_are_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A thread's id is reused once it ends, and every OTLP/gRPC exporter of the process
    (another provider's, the metrics') writes to the same logger: the lines of another
    exporter on a thread with our last export's id were swallowed. Here the same thread
    (the test's) exports for both, ours first."""
    caplog.set_level(logging.INFO)
    sink = OtlpSink()
    sink.start()
    ours = WireSpanExporter(endpoint=f"http://127.0.0.1:{sink.port}", insecure=True, timeout=30)
    theirs = OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{_closed_port()}", insecure=True, timeout=1
    )
    try:
        assert ours.export(_spans(1)) is SpanExportResult.SUCCESS
        assert theirs.export(_spans(1)) is SpanExportResult.FAILURE
        failed = _lines(caplog, SDK_LOGGERS[0], "Failed to export")
        assert len(failed) == 1 and "UNAVAILABLE" in failed[0], failed
        assert not _lines(caplog, "services.common.otlp_wire")  # not ours: nothing said
    finally:
        ours.shutdown(timeout_millis=0)
        theirs.shutdown(timeout_millis=0)
        sink.stop()


class _Held(SpanExporter):
    """An exporter whose exports wait for ``release`` (a fake: the other processor's)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(30)
        return SpanExportResult.SUCCESS


def test_another_processors_queue_full_lines_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    """Ours drops a span at its full queue itself, so the SDK writes no "Queue full" line for
    it and none is filtered: another batch processor's (a logs processor's, an SDK span
    processor's) vanished while our exporter's filter was installed."""
    caplog.set_level(logging.INFO)
    hole = BlackHole()
    exporter = WireSpanExporter(endpoint=hole.endpoint, insecure=True, timeout=1)
    ours = _BatchSpans(exporter, exporter.health, max_queue_size=2, max_export_batch_size=2)
    held = _Held()
    theirs = BatchSpanProcessor(held, max_queue_size=1, max_export_batch_size=1)
    provider = TracerProvider()
    provider.add_span_processor(ours)
    other = TracerProvider()
    other.add_span_processor(theirs)
    # the SDK's DuplicateFilter passes one line alike a 20 s: one written by an earlier test
    # in this process would hide the other processor's below
    for sdk_filter in logging.getLogger(SDK_LOGGERS[1]).filters:
        sdk_filter.__dict__.pop("last_log", None)
    try:
        for i in range(20):
            provider.get_tracer("t").start_span(f"call {i}").end()
        assert exporter.health.dropped_spans >= 14
        assert not _lines(caplog, SDK_LOGGERS[1], "Queue full")  # the SDK wrote none for ours
        assert len(_lines(caplog, "services.common.otlp_wire", "span queue is full")) == 1
        # its worker holds one span in an export, its queue one more: the rest are dropped
        for i in range(5):
            other.get_tracer("t").start_span(f"other {i}").end()
        assert _lines(caplog, SDK_LOGGERS[1], "Queue full, dropping Span"), "a line was lost"
    finally:
        provider.shutdown()
        held.release.set()
        other.shutdown()
        hole.close()


def test_a_renamed_sdk_field_stops_the_start_not_each_span_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The processor reads the SDK's private queue and bound once, when it is built: an SDK
    release renaming one raised AttributeError at every span's end."""
    original = BatchProcessor.__init__

    def renamed(self: BatchProcessor[Any], *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._queue_bound = self.__dict__.pop("_max_queue_size")  # type: ignore[attr-defined]

    monkeypatch.setattr(BatchProcessor, "__init__", renamed)
    exporter = WireSpanExporter(endpoint="http://127.0.0.1:1", insecure=True, timeout=1)
    try:
        with pytest.raises(RuntimeError, match=r"'_max_queue_size'.*constraints\.txt"):
            _BatchSpans(exporter, exporter.health)
    finally:
        exporter.shutdown(timeout_millis=0)


def test_the_collectors_address_is_said_without_its_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A review's find: the endpoint went into the outage line as written, a token in its query
    (or its user part) with it, where the SDK's own lines named the host and port only."""
    caplog.set_level(logging.INFO)
    port = _closed_port()
    endpoint = f"http://user:s3cretPASS@127.0.0.1:{port}/?token=s3cretTOKEN"
    exporter = WireSpanExporter(endpoint=endpoint, insecure=True, timeout=1)
    try:
        assert exporter.export(_spans(1)) is SpanExportResult.FAILURE
        [down] = _lines(caplog, "services.common.otlp_wire", "does not take spans")
        assert f"127.0.0.1:{port}" in down, down
        assert "s3cret" not in caplog.text
    finally:
        exporter.shutdown(timeout_millis=0)
