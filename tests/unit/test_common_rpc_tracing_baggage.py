"""A tenant's W3C baggage stops at the router's Gateway: its trace context goes on into the
internal calls the request makes (a caller's own trace continues through the gateway), its
baggage does not (up to 8 KB of a tenant's entries on every internal call; no service reads
baggage). Internal services, whose callers are the router, keep taking it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.common.rpc_tracing import ClientSpans, ServerTracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"), ("baggage", "team=a,k=v"))


def _forwarding(tracer: Any) -> Callable[[bytes, Any], Any]:
    async def handler(request: bytes, context: Any) -> bytes:
        """What an internal call made while handling this one would carry."""
        _, metadata = ClientSpans(tracer).start("/internal.S/Call")
        return "\n".join(f"{k}={v}" for k, v in metadata).encode()

    return handler


@pytest.fixture(params=[False, True], ids=["tenant-facing", "internal"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[grpc.aio.Channel, bool]]:
    tracer = TracerProvider().get_tracer("t")
    takes = bool(request.param)
    server = grpc.aio.server(interceptors=[ServerTracing(tracer, callers_baggage=takes)])
    handler = grpc.unary_unary_rpc_method_handler(
        _forwarding(tracer), request_deserializer=bytes, response_serializer=bytes
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.S", {"Call": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, takes
    await server.stop(None)


async def test_the_callers_trace_goes_on_and_its_baggage_only_where_callers_are_internal(
    served: tuple[grpc.aio.Channel, bool],
) -> None:
    channel, takes = served
    call = channel.unary_unary("/t.S/Call", request_serializer=bytes, response_deserializer=bytes)
    forwarded = dict(
        line.split("=", 1) for line in (await call(b"x", metadata=CALLER)).decode().splitlines()
    )
    assert TRACE_ID in forwarded["traceparent"]  # the caller's trace, continued
    if takes:
        assert forwarded["baggage"] == "team=a,k=v"
    else:
        assert "baggage" not in forwarded
