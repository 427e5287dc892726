"""A call still running when the drain's grace period ends is cut by gRPC ("Cancelling all
calls": its caller gets UNAVAILABLE), which its handler sees as a cancel, like its caller's
own. ``GraceEnd`` says the grace ended, before gRPC cancels them: the call's SERVER span is
then an UNAVAILABLE error, as its caller saw it, not a caller's CANCELLED (no error); a call
its caller cancelled stays CANCELLED."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.common.grace import GraceEnd
from services.common.rpc_tracing import ServerTracing
from services.common.server import ServerSettings, ServiceSpec, run_service
from services.tools.stack.ports import free_port
from tests.unit.test_server_drain import SERVICE, SLOW_WRITE_S, _in_servicer, _serving

Context = grpc.aio.ServicerContext[Any, Any]


class Held:
    """A call that waits for ever; notes whether its handler saw the grace end."""

    def __init__(self, grace: GraceEnd) -> None:
        self.grace = grace
        self.started = asyncio.Event()
        self.seen: list[bool] = []
        self.cancelled = asyncio.Event()

    async def write(self, request: bytes, context: Context) -> bytes:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.seen.append(self.grace.ended)
            # no status set: a servicer records the cut itself (the router's access line)
            assert not isinstance(context.code(), grpc.StatusCode)
            self.cancelled.set()
            raise
        return b""

    def register(self, server: grpc.aio.Server) -> None:
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            self.write
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Write": handler}),)
        )


def _traced(grace_s: float) -> tuple[int, Held, InMemorySpanExporter, ServiceSpec]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    grace = GraceEnd()
    held = Held(grace)
    port = free_port()
    spec = ServiceSpec(
        name="test",
        settings=ServerSettings(f"127.0.0.1:{port}", grace_s=grace_s, max_message_bytes=1 << 20),
        service_names=[SERVICE],
        register=held.register,
        interceptors=[ServerTracing(provider.get_tracer("test"), grace)],
        grace_end=grace,
    )
    return port, held, exported, spec


@pytest.mark.parametrize("grace_s", [0.0, 0.2])
async def test_a_call_the_grace_end_cuts_is_unavailable_on_its_span(grace_s: float) -> None:
    port, held, exported, spec = _traced(grace_s)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(spec, stop))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await _serving(channel, task)
        write: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{SERVICE}/Write"
        )
        in_flight = asyncio.ensure_future(write(b"slow", timeout=SLOW_WRITE_S))
        await _in_servicer(held.started, in_flight, SLOW_WRITE_S)
        assert not held.grace.ended
        stop.set()  # what SIGTERM does
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await in_flight
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE  # what the caller saw
    await asyncio.wait_for(task, 30)
    assert held.seen == [True]  # marked before gRPC cancelled the call
    (span,) = [s for s in exported.get_finished_spans() if s.name.endswith("/Write")]
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description is not None and "grace" in span.status.description
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_a_call_its_caller_cancels_stays_cancelled() -> None:
    port, held, exported, spec = _traced(5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(spec, stop))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await _serving(channel, task)
        write: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{SERVICE}/Write"
        )
        call = write(b"slow", timeout=SLOW_WRITE_S)
        await _in_servicer(held.started, asyncio.ensure_future(call), SLOW_WRITE_S)
        call.cancel()
        await asyncio.wait_for(held.cancelled.wait(), 30)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert held.seen == [False]
    (span,) = [s for s in exported.get_finished_spans() if s.name.endswith("/Write")]
    assert span.status.status_code == StatusCode.UNSET
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
