"""An OTLP endpoint gRPC cannot dial as written is refused at start-up, naming the variable.

``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:99999`` was taken: gRPC read the port modulo
65536 and exported every span (tenants, models, request ids) to 127.0.0.1:34463, whatever
listens there ("failed to export traces to 127.0.0.1:99999 ... ipv4:127.0.0.1:34463"); a
host with a space ("http://collector 4317") was taken too and failed at each export.

The check reads host:port forms only: a gRPC target (``unix:///run/otel.sock``, a node-local
agent's socket; ``dns:///collector:4317``; ``ipv4:127.0.0.1:4317``) is gRPC's to read, and was
refused by the first version of the check though gRPC dials it (a collector on a unix socket
received 1 span before the check, the start was refused with it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

from services.common.env import ConfigError
from services.common.telemetry import build_tracer_provider

OTLP = {"OTEL_TRACES_EXPORTER": "otlp"}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:99999"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector 4317"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://:4317"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:43x7"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://[::1:4317"),
    ],
)
def test_an_endpoint_grpc_cannot_dial_is_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_tracer_provider({**OTLP, variable: value}, "router")
    message = str(refused.value)
    assert message.startswith(variable) and "\n" not in message


@pytest.mark.parametrize(
    "value",
    [
        "http://127.0.0.1:4317",
        "https://collector.example:4317",
        "collector:4317",
        "http://jaeger:4317/",
    ],
)
def test_a_dialable_endpoint_is_taken(value: str) -> None:
    build_tracer_provider({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": value}, "router").shutdown()


@pytest.mark.parametrize(
    "value",
    [
        "unix:///run/otel/otel.sock",
        "unix:relative/otel.sock",
        "unix-abstract:otel",
        "dns:///collector:4317",
        "ipv4:127.0.0.1:4317",
        "ipv6:[::1]:4317",
        "xds:///collector",
    ],
)
def test_a_grpc_target_is_taken_as_written(value: str) -> None:
    build_tracer_provider(
        {**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": value, "OTEL_EXPORTER_OTLP_INSECURE": "true"},
        "router",
    ).shutdown()


@pytest.fixture
def unix_collector() -> Iterator[tuple[str, list[int]]]:
    """An OTLP collector listening on a unix socket; the spans it received, by export."""
    received: list[int] = []

    def export(
        request: ts.ExportTraceServiceRequest, _context: grpc.ServicerContext
    ) -> ts.ExportTraceServiceResponse:
        received.append(
            sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        )
        return ts.ExportTraceServiceResponse()

    folder = tempfile.mkdtemp(prefix="otel-")  # short: a socket path is 107 bytes at most
    socket = os.path.join(folder, "otel.sock")
    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(
        export,
        request_deserializer=ts.ExportTraceServiceRequest.FromString,
        response_serializer=ts.ExportTraceServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler}
            )
        ]
    )
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield f"unix://{socket}", received
    finally:
        server.stop(None)
        shutil.rmtree(folder)


def test_a_collector_on_a_unix_socket_receives_the_spans(
    unix_collector: tuple[str, list[int]],
) -> None:
    endpoint, received = unix_collector
    provider = build_tracer_provider(
        {**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"},
        "router",
    )
    with provider.get_tracer("probe").start_as_current_span("probe"):
        pass
    assert provider.force_flush(5000)
    provider.shutdown()
    assert sum(received) == 1


def test_a_collector_on_a_unix_socket_receives_the_spans_without_the_insecure_flag(
    unix_collector: tuple[str, list[int]],
) -> None:
    """README's own example (``unix:///run/otel/otel.sock``), OTEL_EXPORTER_OTLP_INSECURE
    unset: the exporter dialled the agent with TLS, and a plaintext agent (a local socket's
    usual one) received 0 spans; a local socket is plaintext unless told otherwise."""
    endpoint, received = unix_collector
    provider = build_tracer_provider({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, "router")
    with provider.get_tracer("probe").start_as_current_span("probe"):
        pass
    assert provider.force_flush(5000)
    provider.shutdown()
    assert sum(received) == 1
