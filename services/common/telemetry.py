"""OpenTelemetry set-up from the standard ``OTEL_*`` variables.

``OTEL_SERVICE_NAME`` names the service (each service passes its own default);
``OTEL_TRACES_EXPORTER`` is ``otlp`` (OTLP over gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT``),
``console`` or ``none``; with ``none`` or ``OTEL_SDK_DISABLED=true`` no span is recorded (the
trace context still flows: responses and logs carry a trace id). The exporter reads the
rest of its ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` variables itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from services.common.env import ConfigError, Env
from services.common.rpc_tracing import ServerTracing

_EXPORTERS = ("otlp", "console", "none")


def build_tracer_provider(environ: Mapping[str, str], default_service_name: str) -> TracerProvider:
    """A provider configured from ``environ``; never installed as a global."""
    env = Env(environ)
    service_name = env.str("OTEL_SERVICE_NAME", default_service_name)
    resource = Resource.create({"service.name": service_name})
    exporter_name = env.str("OTEL_TRACES_EXPORTER", "otlp").lower()
    if exporter_name not in _EXPORTERS:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER must be one of {_EXPORTERS}, got {exporter_name!r}"
        )
    if env.bool("OTEL_SDK_DISABLED", False) or exporter_name == "none":
        # Nothing leaves the process: record no span (their cost without a use), but keep
        # the trace context, so responses and logs still carry a trace id and the calls
        # still carry it to the next service.
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter | None = None
    if exporter_name == "otlp":
        from services.common.otlp_wire import WireSpanExporter

        endpoint = env.str(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            env.str("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
        )
        exporter = WireSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def server_interceptors(provider: TracerProvider) -> list[grpc.aio.ServerInterceptor]:
    """A SERVER span for each call received (the router's CLIENT spans: ``grpc_adapters``)."""
    return [ServerTracing(provider.get_tracer("cachemesh.grpc"))]


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits, or "" when there is none."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
