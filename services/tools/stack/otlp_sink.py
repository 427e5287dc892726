"""A real OTLP/gRPC trace receiver: the services export to it as to any collector.

The integration tests keep every span (``spans_of(trace_id)``); ``make bench`` only counts
them per service (``keep_spans=False``), so that receiving costs what a collector's intake
does and no more.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id) of each span it links
    events: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, attributes) of each event
    status_code: int = 0  # OTLP's: 0 unset, 1 ok, 2 error
    status_message: str = ""  # its description


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _span(service: str, span: Any) -> Span:
    return Span(
        service=service,
        name=span.name,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        kind=span.kind,
        attributes={a.key: _value(a.value) for a in span.attributes},
        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
        events=tuple(
            (event.name, {a.key: _value(a.value) for a in event.attributes})
            for event in span.events
        ),
        status_code=span.status.code,
        status_message=span.status.message,
    )


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, keep_spans: bool) -> None:
        self.keep_spans = keep_spans
        self.spans: list[Span] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[Span] = []
        counts: Counter[str] = Counter()
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope in resource_spans.scope_spans:
                counts[service] += len(scope.spans)
                if self.keep_spans:
                    received += [_span(service, span) for span in scope.spans]
        with self.lock:
            self.spans.extend(received)
            self.counts.update(counts)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink:
    """Listens on a loopback port; ``spans_of(trace_id)`` returns what was exported so far
    (with ``keep_spans``), ``counts()`` how many spans each service exported."""

    def __init__(self, keep_spans: bool = True, port: int = 0) -> None:
        self._receiver = _Receiver(keep_spans)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self._receiver, self._server
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")  # 0: any free one
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=1)

    def spans_of(self, trace_id: str) -> list[Span]:
        if not self._receiver.keep_spans:
            raise RuntimeError("this sink counts spans only (keep_spans=False)")
        with self._receiver.lock:
            return [s for s in self._receiver.spans if s.trace_id == trace_id]

    def all_spans(self) -> list[Span]:
        with self._receiver.lock:
            return list(self._receiver.spans)

    def counts(self) -> dict[str, int]:
        """Service name -> spans received from it so far."""
        with self._receiver.lock:
            return dict(sorted(self._receiver.counts.items()))
