"""The OTLP exporter's credentials (a user part in OTEL_EXPORTER_OTLP_ENDPOINT, the
OTEL_EXPORTER_OTLP_(TRACES_)HEADERS) never reach a message or a log line, and a setting that
cannot carry them stops the start naming its variable.

Before: an endpoint refused for its port quoted itself whole, password included (5 of 5
refused endpoints with a user part; "Port could not be cast to integer value as 'S3cret'"
quoted a piece of it even once redacted); a dialable endpoint with a user part was taken and
every export failed (0 of 1 spans received: the exporter dials ``user:pass@host``); a headers
value the exporter could not read was logged whole at WARNING by the OpenTelemetry SDK (3 of 5
shapes) and the service exported without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.common.env import ConfigError
from services.common.telemetry import build_tracer_provider

OTLP = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "50"}
SECRET = "S3cretOtlpPw"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://alice:{SECRET}@collector.example:99999"),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            f"http://alice:{SECRET[:6]}/x?{SECRET[6:]}@coll ector:4317",
        ),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://:{SECRET}@:4317"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"alice:{SECRET}@collector:0"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"https://alice:{SECRET}@[::1:4317"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://alice:{SECRET}@127.0.0.1:4317"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"{SECRET}@127.0.0.1:4317"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"collector:4317?token={SECRET}"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://alice:{SECRET[:6]}?{SECRET[6:]}@collector:4317"),
    ],
)
def test_an_endpoint_with_credentials_is_refused_without_them(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_tracer_provider({**OTLP, variable: value}, "router")
    message = str(refused.value)
    assert message.startswith(variable)
    for piece in (SECRET, SECRET[:6], SECRET[6:], "alice"):
        assert piece not in message, message


def _export_one_span(provider: TracerProvider) -> None:
    """One span ended and flushed through ``provider``'s exporter, then the provider shut down."""
    try:
        with provider.get_tracer("test").start_as_current_span("one"):
            pass
        provider.force_flush(10_000)
    finally:
        provider.shutdown()


def test_a_user_part_points_at_the_headers() -> None:
    endpoint = f"http://alice:{SECRET}@127.0.0.1:4317"
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_HEADERS"):
        build_tracer_provider({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "router")


def _refused_headers(variable: str, value: str, caplog: pytest.LogCaptureFixture) -> str:
    """The message of the ConfigError that stops a start with ``value`` in ``variable`` (the
    log captured at DEBUG, for the tests to check no secret reached it)."""
    caplog.set_level(logging.DEBUG)
    environ = {**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", variable: value}
    with pytest.raises(ConfigError) as refused:
        build_tracer_provider(environ, "router")
    return str(refused.value)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (f"x-api-key:{SECRET}", ""),
        (f'api-key={SECRET}"', "'api-key'"),
        (SECRET, ""),
        (f"team=a,authorization=Bearer {SECRET};x", "'authorization'"),
    ],
)
@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"]
)
def test_headers_the_exporter_cannot_read_stop_the_start_unshown(
    variable: str, value: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = _refused_headers(variable, value, caplog)
    assert message.startswith(variable) and named in message
    assert SECRET not in message and SECRET not in caplog.text


class _Receiver(ts_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.received = threading.Event()

    def Export(
        self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ts.ExportTraceServiceResponse:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        self.received.set()
        return ts.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[_Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Receiver()
    ts_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def test_the_headers_of_the_settings_given_are_sent(receiver: tuple[_Receiver, int]) -> None:
    """The headers come from the settings the service was given (the traces' own first), as
    the exporter read them from the process's environment (URL-encoded values decoded)."""
    servicer, port = receiver
    environ = {
        **OTLP,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-general=no",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"x-honeycomb-team={SECRET},authorization=Basic%20YQ",
    }
    _export_one_span(build_tracer_provider(environ, "router"))
    assert servicer.received.wait(10)
    sent = servicer.metadata[0]
    assert sent["x-honeycomb-team"] == SECRET and sent["authorization"] == "Basic YQ"
    assert "x-general" not in sent


class _Refuser(ts_grpc.TraceServiceServicer):
    """A collector that refuses the key it was sent, quoting it, as some do."""

    def Export(
        self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ts.ExportTraceServiceResponse:
        sent = {k: str(v) for k, v in context.invocation_metadata()}
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"unknown API key {sent.get('x-honeycomb-team')} ({sent.get('authorization')})",
        )


def test_a_collector_quoting_the_key_it_refused_is_said_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: "refuses the spans (UNAUTHENTICATED: unknown API key <the key>)" at ERROR."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(_Refuser(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    caplog.set_level(logging.INFO)
    token = "bearerS3cretToken"
    environ = {
        **OTLP,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-honeycomb-team={SECRET},authorization=Bearer {token}",
    }
    try:
        _export_one_span(build_tracer_provider(environ, "router"))
    finally:
        server.stop(grace=None)
    said = [r.getMessage() for r in caplog.records if "refuses the spans" in r.getMessage()]
    assert said and "UNAUTHENTICATED: unknown API key ***" in said[0]
    assert SECRET not in caplog.text and token not in caplog.text


def test_an_endpoint_with_a_query_is_said_once_and_exports_go_on(
    receiver: tuple[_Receiver, int], caplog: pytest.LogCaptureFixture
) -> None:
    """The exporter dials an http(s) endpoint's host:port and drops its query: before, such an
    endpoint (which had exported: 1 of 1 span received) stopped the start; now one WARNING,
    the query not shown, and the spans go to the collector."""
    servicer, port = receiver
    caplog.set_level(logging.INFO)
    endpoint = f"http://127.0.0.1:{port}/?tenant={SECRET}"
    _export_one_span(
        build_tracer_provider({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "router")
    )
    assert servicer.received.wait(10)
    said = [r for r in caplog.records if "has a query" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert f"http://127.0.0.1:{port}/?***" in said[0].getMessage()
    assert "OTEL_EXPORTER_OTLP_HEADERS" in said[0].getMessage()
    assert SECRET not in caplog.text


def test_an_at_sign_past_the_authority_is_no_user_part(receiver: tuple[_Receiver, int]) -> None:
    """Before: ``http://collector:4317/a@b`` was refused as a user part; the exporter dials
    the authority only."""
    servicer, port = receiver
    endpoint = f"http://127.0.0.1:{port}/a@b"
    _export_one_span(
        build_tracer_provider({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "router")
    )
    assert servicer.received.wait(10)


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"]
)
def test_headers_come_from_the_settings_only(
    variable: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings without headers, the process's environment with some: before, the exporter
    read them from os.environ behind the settings, sent them, and ExportHealth (built from
    the settings' none) quoted the key a collector refused at ERROR (1 of 1)."""
    monkeypatch.setenv(variable, f"x-honeycomb-team={SECRET}")
    sent: list[dict[str, str]] = []

    class _Recording(_Refuser):
        def Export(
            self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext
        ) -> ts.ExportTraceServiceResponse:
            sent.append({k: str(v) for k, v in context.invocation_metadata()})
            return super().Export(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(_Recording(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    caplog.set_level(logging.INFO)
    environ = {**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    try:
        _export_one_span(build_tracer_provider(environ, "router"))
    finally:
        server.stop(grace=None)
    assert SECRET not in caplog.text
    assert sent and all("x-honeycomb-team" not in metadata for metadata in sent)
    assert any("refuses the spans" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("value", "named", "what"),
    [
        (f"x-team=ok,x-key={SECRET}%C3%A9", "header 2 of 2 ('x-key')", "value"),
        (f"x-key={SECRET}%00", "header 1 of 1 ('x-key')", "value"),
        (f"x-key={SECRET}%7F,x-team=ok", "header 1 of 2 ('x-key')", "value"),
        (f"x-k%C3%A9y={SECRET}", "header 1 of 1 has", "name"),
    ],
    ids=["non-ascii", "nul", "del", "name"],
)
def test_a_header_not_printable_ascii_once_decoded_stops_the_start_unshown(
    value: str, named: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A header value (or name) that URL-decodes to more than printable ASCII: gRPC sends no
    such header, and every export failed ("INTERNAL: Invalid metadata", 0 of 3 exports
    received, the warning naming OTEL_EXPORTER_OTLP_ENDPOINT); now the start stops, naming
    the variable and the header's position, never its value."""
    message = _refused_headers("OTEL_EXPORTER_OTLP_HEADERS", value, caplog)
    assert message.startswith("OTEL_EXPORTER_OTLP_HEADERS: ") and named in message, message
    assert f"has a {what} that is not printable ASCII" in message
    assert SECRET not in message and SECRET not in caplog.text


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (f"x-trace-bin={SECRET}", "header 1 of 1 ('x-trace-bin')"),
        (f"x-team=ok,X-Key-Bin={SECRET}", "header 2 of 2 ('x-key-bin')"),
    ],
    ids=["bin", "bin-upper"],
)
def test_a_binary_header_name_stops_the_start_unshown(
    value: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A header name ending in ``-bin`` is binary metadata to gRPC, which takes bytes only:
    the start check let it through and every export failed ("TypeError: Binary metadata key
    ... expected bytes"); now the start stops, naming the variable and the header's position,
    never its value."""
    message = _refused_headers("OTEL_EXPORTER_OTLP_HEADERS", value, caplog)
    assert message.startswith("OTEL_EXPORTER_OTLP_HEADERS: ") and named in message, message
    assert "-bin" in message and SECRET not in message and SECRET not in caplog.text
