"""The servers' interceptors wrap a method's handler once, not once a call: the wrapped handler
is made for the handler the inner layers return and reused while they return that one; what
belongs to each call (its caller's span, its credential) is still read from that call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, cast

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.rpc_tracing import ServerTracing
from services.common.wire import Malformed, MalformedRequests

METHOD = "/cachemesh.v1.SemanticCache/Lookup"
TRACE_IDS = ("0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736")


class Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Context:
    """What the wrapped handlers read of a call's servicer context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def _metadata(trace_id: str) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),)


async def _echo(request: Any, context: Any) -> Any:
    return request


def _served(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[[Any], Awaitable[Any]]:
    async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    return continuation


def _details(trace_id: str | None = None) -> grpc.HandlerCallDetails:
    metadata = _metadata(trace_id) if trace_id is not None else ()
    return cast(grpc.HandlerCallDetails, Details(METHOD, metadata))


def _context(trace_id: str | None = None) -> Any:
    return Context(_metadata(trace_id) if trace_id is not None else ())


async def test_a_methods_traced_handler_is_made_once_and_each_call_has_its_callers_parent() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = ServerTracing(provider.get_tracer("t"))
    inner: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_echo)
    handlers = []
    for trace_id in TRACE_IDS:
        handler = await tracing.intercept_service(_served(inner), _details(trace_id))
        assert handler is not None and handler.unary_unary is not None
        assert await handler.unary_unary(b"q", _context(trace_id)) == b"q"
        handlers.append(handler)
    assert handlers[0] is handlers[1]  # made once for the method
    spans = exporter.get_finished_spans()
    assert [f"{s.context.trace_id:032x}" for s in spans if s.context] == list(TRACE_IDS)
    assert all(s.name == METHOD for s in spans)
    other: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        _echo
    )  # another inner handler: made anew
    again = await tracing.intercept_service(_served(other), _details())
    assert again is not handlers[0]


async def test_a_methods_checked_handler_is_made_once_and_still_refuses_a_malformed_request() -> (
    None
):
    refused: list[str] = []
    checking = MalformedRequests(refused.append)
    inner: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=bytes.decode
    )
    first = await checking.intercept_service(_served(inner), _details())
    second = await checking.intercept_service(_served(inner), _details())
    assert first is not None and first is second
    parse = first.request_deserializer
    assert parse is not None and parse(b"ok") == "ok"
    bad = parse(b"\xff")
    assert isinstance(bad, Malformed)
    context = Context(())
    assert first.unary_unary is not None
    with pytest.raises(grpc.aio.AbortError):
        await first.unary_unary(bad, cast(Any, context))
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused == [METHOD]
