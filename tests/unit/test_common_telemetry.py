"""The tracer provider from the OTEL_* variables: spans are recorded only when they leave."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from opentelemetry.trace import format_trace_id

from services.common.env import ConfigError, Env
from services.common.otlp_wire import EXPORTER_LOGGER
from services.common.telemetry import _insecure, build_tracer_provider, stop_tracing
from tests.black_hole import BlackHole


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


@pytest.mark.parametrize(
    ("endpoint", "environ", "insecure"),
    [
        ("http://collector:4317", {}, True),
        ("https://collector:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "true"}, False),
        # the usual scheme-less endpoint of a plaintext collector, told it is insecure: the
        # variable was ignored and every span went out as TLS to a plaintext port, lost
        ("collector:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "true"}, True),
        ("collector:4317", {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true"}, True),
        ("collector:4317", {}, False),
        ("http://collector:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "false"}, False),
        # a socket on this host (a node-local agent) is plaintext unless told otherwise: it
        # was dialled with TLS, and a plaintext agent received no span
        ("unix:///run/otel/otel.sock", {}, True),
        ("unix:run/otel.sock", {}, True),
        ("UNIX-ABSTRACT:otel", {}, True),
        ("vsock:2:4317", {}, True),
        ("unix:///run/otel/otel.sock", {"OTEL_EXPORTER_OTLP_INSECURE": "false"}, False),
        ("dns:///collector:4317", {}, False),  # a remote collector: TLS, as collector:4317
    ],
)
def test_plaintext_or_tls_is_what_the_otlp_variables_say(
    endpoint: str, environ: dict[str, str], insecure: bool
) -> None:
    assert _insecure(Env(environ), endpoint) is insecure


def test_an_insecure_flag_that_is_not_a_boolean_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_INSECURE must be true or false"):
        _insecure(Env({"OTEL_EXPORTER_OTLP_INSECURE": "maybe"}), "collector:4317")


@pytest.mark.parametrize(
    "name", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_an_otlp_protocol_other_than_grpc_is_refused_naming_the_variable(name: str) -> None:
    # http/protobuf was ignored: gRPC went to the collector's HTTP port, every span lost
    with pytest.raises(ConfigError, match=f"{name} must be grpc"):
        build_tracer_provider({name: "http/protobuf"}, "router")


def test_the_service_name_of_the_resource_attributes_is_kept() -> None:
    attributes = {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=router-eu-1"
    }
    named = build_tracer_provider({**attributes, "OTEL_TRACES_EXPORTER": "none"}, "router")
    assert named.resource.attributes["service.name"] == "router-eu-1"
    both = {**attributes, "OTEL_SERVICE_NAME": "router-a", "OTEL_TRACES_EXPORTER": "none"}
    assert build_tracer_provider(both, "router").resource.attributes["service.name"] == "router-a"
    plain = build_tracer_provider({"OTEL_TRACES_EXPORTER": "none"}, "router")
    assert plain.resource.attributes["service.name"] == "router"


async def test_the_tracing_stop_is_bounded_and_off_the_event_loop_with_a_hung_collector(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A collector that takes connections and never answers held each service's stop (the
    SDK's shutdown waits 30 s for its export thread, each export up to
    OTEL_EXPORTER_OTLP_TIMEOUT), on the event loop: past the grace, SIGKILL. The stop now
    gives the collector TRACING_STOP_S, in a thread, and says what was dropped."""
    hole = BlackHole()
    # read by build_tracer_provider from the environment it is given (not the process's: set
    # there, the export's bound stayed 10 s and the first export waited the 5 s default delay)
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": hole.endpoint,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "600",  # an export alone: ten minutes
        "OTEL_BSP_SCHEDULE_DELAY": "10",
    }
    try:
        provider = build_tracer_provider(environ, "router")
        provider.get_tracer("t").start_span("exported first").end()
        assert await asyncio.to_thread(hole.accepted.wait, 30)  # the export is in flight
        provider.get_tracer("t").start_span("queued behind it").end()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(tick())
        await asyncio.sleep(0.05)
        before = ticks
        with caplog.at_level(logging.WARNING, "cachemesh.telemetry"):
            # the grace a service has for its whole stop (CACHEMESH_GRACE_S' default): the
            # SDK's own shutdown would take thirty
            await asyncio.wait_for(stop_tracing(provider), timeout=10.0)
        ticking.cancel()
        assert ticks - before >= 10  # the loop ran on while the collector was waited for
        assert "the collector did not take the last spans within 2 s" in caplog.text
    finally:
        hole.close()


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        # the SDK took it as 2048 (an ERROR traceback) and the service started
        ("OTEL_BSP_MAX_QUEUE_SIZE", "abc", "OTEL_BSP_MAX_QUEUE_SIZE must be an integer"),
        # the SDK: "max_queue_size must be a positive integer.", naming no variable
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "OTEL_BSP_MAX_QUEUE_SIZE must be >= 1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096", "at most OTEL_BSP_MAX_QUEUE_SIZE (2048)"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon", "OTEL_BSP_SCHEDULE_DELAY must be an integer"),
        # 0 is the specification's "no limit" (the Python SDK does not use it): -1 is not
        ("OTEL_BSP_EXPORT_TIMEOUT", "-1", "OTEL_BSP_EXPORT_TIMEOUT must be >= 0"),
        # the exporter: "could not convert string to float: 'abc'", naming no variable
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "OTEL_EXPORTER_OTLP_TIMEOUT must be a number"),
        # the exporter took a 0 as unset (``timeout or ...``)
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT must be"),
        # the specification's milliseconds: an export would wait 2.8 hours
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10000", "10000 looks like milliseconds"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "600.5", "600.5 looks like milliseconds"),
    ],
)
def test_the_span_queue_and_export_settings_are_refused_naming_the_variable(
    name: str, value: str, said: str
) -> None:
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
        build_tracer_provider({name: value}, "router")


def test_the_span_queue_and_export_settings_are_read_from_the_services_environment() -> None:
    """From the mapping the service was given (the SDK read ``os.environ`` itself); a queue
    set below the default batch sends batches of the whole queue (the SDK refused it)."""
    environ = {
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
    }
    provider = build_tracer_provider(environ, "router")
    try:
        (processor,) = provider._active_span_processor._span_processors
        batch = processor._batch_processor  # type: ignore[attr-defined]
        assert (batch._max_queue_size, batch._max_export_batch_size) == (100, 100)
        assert batch._schedule_delay == 0.25
        assert batch._exporter._timeout == 2.5  # the traces' own
    finally:
        provider.shutdown()


def test_a_zero_export_timeout_of_the_batch_processor_is_taken() -> None:
    """``OTEL_BSP_EXPORT_TIMEOUT=0`` is the specification's "no limit"; the Python SDK's
    processor does not use the setting: it was refused, stopping the start."""
    provider = build_tracer_provider(
        {"OTEL_BSP_EXPORT_TIMEOUT": "0", "OTEL_EXPORTER_OTLP_TIMEOUT": "600"}, "router"
    )
    try:
        (processor,) = provider._active_span_processor._span_processors
        assert processor._batch_processor._export_timeout_millis == 0  # type: ignore[attr-defined]
        assert processor._batch_processor._exporter._timeout == 600  # type: ignore[attr-defined]
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_BSP_MAX_QUEUE_SIZE": "abc"},
        {"OTEL_BSP_SCHEDULE_DELAY": "-5"},
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "30000"},
    ],
)
def test_a_refused_setting_builds_no_exporter(environ: dict[str, str]) -> None:
    """Every setting is read before the exporter is built: a refused batch setting left the
    built exporter's log filter on the SDK's logger (and its channel open)."""
    sdk_logger = logging.getLogger(EXPORTER_LOGGER)
    before = list(sdk_logger.filters)
    with pytest.raises(ConfigError):
        build_tracer_provider(environ, "router")
    assert sdk_logger.filters == before


def test_a_blank_traces_timeout_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter reads ``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`` from the process's environment
    and float()s it whatever its argument: set but blank, the start stopped with "could not
    convert string to float: ''" naming no variable (Env reads blank as unset)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_TIMEOUT is set but blank"):
        build_tracer_provider(os.environ, "router")
