"""Spans a service drops unexported are counted on its metrics
(``cachemesh_spans_dropped_total{reason}``) and said in a line bounded in rate: the SDK's
batch processor dropped them at a full queue, and the exporter those of exports the collector
did not take, with no count anywhere (320 spans sent, 8 received, nothing on /metrics). Real
gRPC: the provider a service builds from its settings exporting to a real OTLP receiver
stopped mid-run, and a receiver that never answers."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import pytest
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from services.common import telemetry
from services.common.clock import ManualClock
from services.common.metrics import new_registry
from services.common.otlp_wire import DROPPED_LINE_EVERY_S, ExportHealth, WireSpanExporter
from services.common.telemetry import SpanDrops, _BatchSpans, build_tracer_provider
from services.tools.stack.otlp_sink import OtlpSink
from tests.black_hole import BlackHole

QUEUE, BATCH = 8, 4


def _dropped(registry: CollectorRegistry) -> dict[str, float]:
    return {
        reason: registry.get_sample_value("cachemesh_spans_dropped_total", {"reason": reason})
        or 0.0
        for reason in ("queue_full", "export_failed", "shutdown")
    }


def _until(done: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    """Waits for ``done`` (a bound on waiting, not a figure asserted)."""
    end = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < end, f"not within {within_s:g} s: {what}"
        time.sleep(0.02)


def test_spans_dropped_at_a_full_queue_and_in_failed_exports_are_counted() -> None:
    sink = OtlpSink()
    sink.start()
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_BSP_MAX_QUEUE_SIZE": str(QUEUE),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(BATCH),
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    provider = build_tracer_provider(environ, "router")
    registry = new_registry()
    registry.register(SpanDrops(provider))
    tracer = provider.get_tracer("t")
    stopped = False
    try:
        # both series from the start (rate() sees the first drop)
        assert _dropped(registry) == {"queue_full": 0.0, "export_failed": 0.0, "shutdown": 0.0}
        # a burst the collector takes but the queue cannot hold: each span is received or
        # counted dropped, none lost unsaid
        for i in range(40):
            tracer.start_span(f"burst {i}").end()
        assert provider.force_flush(30_000)
        received = sum(sink.counts().values())
        dropped = _dropped(registry)
        assert dropped["queue_full"] > 0, (received, dropped)
        assert dropped["export_failed"] == 0
        assert received + dropped["queue_full"] == 40, (received, dropped)
        # the collector stopped mid-run: spans dropped at the full queue, and the exports it
        # does not take, counted; at most a queue and a batch held unsaid
        sink.stop()
        stopped = True
        for i in range(200):
            tracer.start_span(f"outage {i}").end()
        _until(lambda: _dropped(registry)["export_failed"] > 0, "an export failed, counted")
        after = _dropped(registry)
        assert sum(sink.counts().values()) == received  # none taken since the stop
        queue_full = after["queue_full"] - dropped["queue_full"]
        counted = queue_full + after["export_failed"]
        assert queue_full > 0, after
        assert 200 - QUEUE - BATCH <= counted <= 200, after
    finally:
        if not stopped:
            sink.stop()
        provider.shutdown()


def test_no_otlp_export_no_series() -> None:
    """With ``none`` nothing is exported nor dropped: no series claims a count of 0 for an
    export that does not exist."""
    registry = new_registry()
    registry.register(SpanDrops(build_tracer_provider({"OTEL_TRACES_EXPORTER": "none"}, "model")))
    assert (
        registry.get_sample_value("cachemesh_spans_dropped_total", {"reason": "queue_full"}) is None
    )


def test_the_dropped_spans_line_is_said_again_while_they_go_on_at_most_once_a_while(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was said once an outage, and a collector slow but answering is never one: the first
    burst's line was the process's last whatever was dropped after. Now the first drop is said
    at once, then at most every ``DROPPED_LINE_EVERY_S`` with the count since (the clock
    injected)."""
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    hole = BlackHole()  # never answers: the worker holds one batch, the queue one more
    exporter = WireSpanExporter(endpoint=hole.endpoint, insecure=True, timeout=30, clock=clock)
    processor = _BatchSpans(exporter, exporter.health, max_queue_size=2, max_export_batch_size=2)
    registry = new_registry()
    provider = telemetry.TracingProvider()
    provider.export_health = exporter.health
    provider.add_span_processor(processor)
    registry.register(SpanDrops(provider))

    def lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "services.common.otlp_wire" and "span queue is full" in r.getMessage()
        ]

    def burst(n: int) -> None:
        for i in range(n):
            provider.get_tracer("t").start_span(f"call {i}").end()

    try:
        burst(20)
        # the first line ever: no count "since" a line never said
        assert len(lines()) == 1 and "spans are dropped (" in lines()[0], lines()
        first = _dropped(registry)["queue_full"]
        burst(20)  # within the interval: counted, not said
        assert len(lines()) == 1, lines()
        before = _dropped(registry)["queue_full"]
        assert before > first
        clock.advance(s=DROPPED_LINE_EVERY_S)
        burst(20)  # the export still held: each span dropped, the first said
        assert len(lines()) == 2, lines()
        # every drop since the first line's, this burst's first included
        assert f", {int(before)} since the last count of them said" in lines()[1], lines()
        assert hole.endpoint in lines()[1]
        clock.advance(s=DROPPED_LINE_EVERY_S - 1)
        burst(5)
        assert len(lines()) == 2, lines()
    finally:
        monkeypatch.setattr(telemetry, "TRACING_STOP_S", 0.05)
        provider.shutdown()
        hole.close()


def test_the_outages_figure_counts_the_outages_drops_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ "Dropped meanwhile: N at a full queue" when the collector takes spans again counted
    every drop since the last outage, a burst's while the collector took spans included."""
    caplog.set_level(logging.INFO)
    health = ExportHealth("http://127.0.0.1:4317", clock=ManualClock())
    for _ in range(5):  # a burst the queue could not hold, the collector taking spans
        health.dropped()
    health.exported(True, 4)
    health.exported(False, 4)  # an outage
    for _ in range(3):
        health.dropped()
    health.exported(True, 4)
    back = [r.getMessage() for r in caplog.records if "takes spans again" in r.getMessage()]
    assert len(back) == 1 and back[0].endswith(
        "dropped meanwhile: 4 spans in 1 exports it did not take, 3 at a full queue"
    ), back
    assert health.totals() == (8, 4)  # the metrics' counts are since the start


def _queue_full_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "span queue is full" in r.getMessage()]


def test_the_outages_drops_once_counted_on_its_end_are_not_counted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The queue-full line's count "since" kept an outage's drops its end had counted: an
    outage dropping 500, its end saying 500, and a 3-span burst an hour later said "502 since"
    (the clock injected)."""
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    health = ExportHealth("http://127.0.0.1:4317", clock=clock)
    health.dropped()  # a burst's first drop, said
    health.exported(False, 4)  # an outage
    for _ in range(500):
        health.dropped()
    health.exported(True, 4)  # back: its line counts the outage's drops
    back = [r.getMessage() for r in caplog.records if "takes spans again" in r.getMessage()]
    assert len(back) == 1 and back[0].endswith("501 at a full queue"), back
    clock.advance(s=3600)
    for _ in range(3):
        health.dropped()
    lines = _queue_full_lines(caplog)
    assert len(lines) == 2, lines
    # the burst's first drop, this line's own: none of the outage's
    assert [int(n) for n in re.findall(r", (\d+) since", lines[1])] == [1], lines
    assert health.totals() == (504, 4)


def test_an_outage_already_said_does_not_repeat_the_queue_full_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """During an outage the queue-full line came again every minute (60 WARNINGs an hour a
    service) beside the outage's own line, which says spans are dropped; its end counts them.
    Outside an outage, it is said again once the interval has passed."""
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    health = ExportHealth("http://127.0.0.1:4317", clock=clock)
    health.dropped()
    assert len(_queue_full_lines(caplog)) == 1
    health.exported(False, 4)  # an outage, said
    for _ in range(60):  # an hour of it, a drop a minute
        clock.advance(s=DROPPED_LINE_EVERY_S)
        health.dropped()
    assert len(_queue_full_lines(caplog)) == 1, _queue_full_lines(caplog)
    health.exported(True, 4)
    clock.advance(s=DROPPED_LINE_EVERY_S)
    health.dropped()  # no outage: said again
    lines = _queue_full_lines(caplog)
    assert len(lines) == 2 and ", 1 since the last count of them said" in lines[1], lines


def _stop_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the stop left" in r.getMessage()]


def _ending_a_span_in_the_stop(
    monkeypatch: pytest.MonkeyPatch, processor: _BatchSpans, tracer: Tracer
) -> None:
    """A span ends once the stop began, before its wait (a request's thread ending its span
    as the service stops)."""
    batch = processor._batch_processor
    stop = batch.shutdown

    def shutdown(timeout_millis: int = 30_000) -> None:
        tracer.start_span("in the stop").end()
        stop(timeout_millis=timeout_millis)

    monkeypatch.setattr(batch, "shutdown", shutdown)


def test_spans_the_stop_leaves_unexported_are_counted_as_shutdown_and_said_in_its_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector that never answers at the stop: the export in flight is cut and the spans
    queued behind it are left once ``TRACING_STOP_S`` is over, and spans ending after the
    stop began are dropped; none was counted before ad4c02b3, and the ``shutdown`` count
    reaches ``/metrics`` in the stop's last milliseconds (after the last scrape, in
    practice): the stop's WARNING line is where a person reads it. It says each part: the
    queued, the cut export's (its size noted when the export began: it ends on the SDK's
    worker, after the line, unwaited for), the ended once the stop began (main: the line
    gave only the queued, 8 of 13). The metric counts each once, the span ending after the
    line too."""
    monkeypatch.setattr(telemetry, "TRACING_STOP_S", 0.05)
    hole = BlackHole()
    exporter = WireSpanExporter(endpoint=hole.endpoint, insecure=True, timeout=30)
    processor = _BatchSpans(
        exporter,
        exporter.health,
        max_queue_size=QUEUE,
        max_export_batch_size=BATCH,
        schedule_delay_millis=20,
    )
    provider = telemetry.TracingProvider()
    provider.export_health = exporter.health
    provider.add_span_processor(processor)
    registry = new_registry()
    registry.register(SpanDrops(provider))
    tracer = provider.get_tracer("t")
    _ending_a_span_in_the_stop(monkeypatch, processor, tracer)
    try:
        for i in range(BATCH):  # the first batch: its export in flight, never answered
            tracer.start_span(f"in flight {i}").end()
        assert hole.accepted.wait(30)
        for i in range(QUEUE):  # queued behind it, the queue full to its bound, no drop
            tracer.start_span(f"queued {i}").end()
        with caplog.at_level(logging.WARNING, "cachemesh.telemetry"):
            provider.shutdown()
        tracer.start_span("after the stop").end()  # after its line: counted only
        total = BATCH + QUEUE + 2
        # the cut export ends on the SDK's worker thread, maybe after the shutdown returned
        _until(lambda: _dropped(registry)["shutdown"] >= total, f"{total} counted")
        assert _dropped(registry) == {"queue_full": 0.0, "export_failed": 0.0, "shutdown": total}
        lines = _stop_lines(caplog)
        assert len(lines) == 1, lines
        assert lines[0].startswith(
            "tracing: the collector did not take the last spans within 0 s "
            "(OTEL_EXPORTER_OTLP_ENDPOINT not answering?): "
            f"the stop left {BATCH + QUEUE + 1} spans unexported: {QUEUE} still queued, "
            f"{BATCH} in the export it cut, 1 ended after it began"
        ), lines
        assert "/metrics shows only to a scrape made during the stop" in lines[0]
    finally:
        hole.close()


def test_a_prompt_stop_that_drops_a_span_ending_in_it_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector that takes every span: the stop is prompt, yet a span ending once it
    began is dropped: said (main: no line, the stop within its bound); a stop dropping
    nothing says nothing."""
    sink = OtlpSink()
    sink.start()
    try:
        for late in (True, False):
            caplog.clear()
            provider = build_tracer_provider({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}, "m")
            processors = provider._active_span_processor._span_processors
            (processor,) = [p for p in processors if isinstance(p, _BatchSpans)]
            tracer = provider.get_tracer("t")
            with monkeypatch.context() as patch:
                if late:
                    _ending_a_span_in_the_stop(patch, processor, tracer)
                tracer.start_span("before the stop").end()
                with caplog.at_level(logging.WARNING, "cachemesh.telemetry"):
                    provider.shutdown()
            lines = _stop_lines(caplog)
            if late:
                assert lines == [
                    "tracing: the stop left 1 spans unexported: 0 still queued, 0 in the "
                    "export it cut, 1 ended after it began (also counted in "
                    'cachemesh_spans_dropped_total{reason="shutdown"}, which /metrics shows '
                    "only to a scrape made during the stop)"
                ], caplog.text
            else:
                assert lines == [], caplog.text
    finally:
        sink.stop()
