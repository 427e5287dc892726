"""An OTLP endpoint gRPC cannot dial as written is refused at start-up, naming the variable.

``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:99999`` was taken: gRPC read the port modulo
65536 and exported every span (tenants, models, request ids) to 127.0.0.1:34463, whatever
listens there ("failed to export traces to 127.0.0.1:99999 ... ipv4:127.0.0.1:34463"); a
host with a space ("http://collector 4317") was taken too and failed at each export."""

from __future__ import annotations

import pytest

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
