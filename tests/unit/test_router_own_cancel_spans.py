"""A call the router itself gives up (its caller cancelled, or it cancels a model stream) is no
failure of the callee: its CLIENT span records the gRPC status (CANCELLED) and no ERROR, as
``rpc_tracing`` leaves a caller's cancel on a SERVER span. A call the callee failed stays an
ERROR."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.rpc_tracing import ClientSpans
from services.router.dependencies import CallFailed
from services.router.grpc_adapters import GrpcModelStream, GrpcSemantic
from tests.waits import reached

_CANCELLED = grpc.StatusCode.CANCELLED.value[0]


def _spans() -> tuple[ClientSpans, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return ClientSpans(provider.get_tracer("test")), exported


def _one(exported: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exported.get_finished_spans()
    return span


class _HeldStub:
    """A Lookup that never answers (the router's caller leaves first)."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def Lookup(self, request: Any, **call: Any) -> Any:
        self.called.set()
        await asyncio.Event().wait()


class _FailingStub:
    async def Lookup(self, request: Any, **call: Any) -> Any:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
        )


class _Call:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_lookup_the_routers_caller_cancelled_is_no_error() -> None:
    spans, exported = _spans()
    stub = _HeldStub()
    semantic = GrpcSemantic(stub, spans)  # type: ignore[arg-type]
    task = asyncio.ensure_future(semantic.lookup(sc.LookupRequest(), 5.0))
    await reached(stub.called, "stub.called")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    span = _one(exported)
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == _CANCELLED
    assert span.status.status_code == StatusCode.UNSET


async def test_a_lookup_the_callee_failed_is_still_an_error() -> None:
    spans, exported = _spans()
    semantic = GrpcSemantic(_FailingStub(), spans)  # type: ignore[arg-type]
    with pytest.raises(CallFailed):
        await semantic.lookup(sc.LookupRequest(), 5.0)
    assert _one(exported).status.status_code == StatusCode.ERROR


def test_a_model_stream_the_router_cancels_is_no_error() -> None:
    spans, exported = _spans()
    span, _ = spans.start("/cachemesh.v1.Model/Generate")
    call = _Call()
    stream = GrpcModelStream(call, span)  # type: ignore[arg-type]
    stream.cancel()
    assert call.cancelled
    ended = _one(exported)
    assert ended.attributes is not None and ended.attributes["rpc.grpc.status_code"] == _CANCELLED
    assert ended.status.status_code == StatusCode.UNSET


class _BrokenStub:
    async def Lookup(self, request: Any, **call: Any) -> Any:
        raise ValueError("not a call's answer")


async def test_a_lookup_the_router_itself_failed_is_an_unknown_error() -> None:
    spans, exported = _spans()
    semantic = GrpcSemantic(_BrokenStub(), spans)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await semantic.lookup(sc.LookupRequest(), 5.0)
    span = _one(exported)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]
