"""A Gateway request over ROUTER_MAX_REQUEST_BYTES is refused by the router itself:
RESOURCE_EXHAUSTED naming its size, the limit and the setting, counted in
``cachemesh_router_errors_total``, with its access-log line and its span.

gRPC's transport was set to the limit itself, so it refused such a request before any code of
the router ran: a 1,190,027-byte prompt (136,001 tokens, within sim-large's 200k window) got
"Received message larger than max (1190027 vs. 1048576)", naming no setting, in no metric, no
access-log line and no span. The transport now reads up to twice the limit; only a request
over that gets gRPC's own words."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.env import Env
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.common.models import load_model_table
from services.common.rpc_tracing import ServerTracing
from services.common.server import grpc_server_options
from services.common.wire import MalformedRequests
from services.router.metrics import RouterMetrics
from services.router.settings import RouterSettings
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY
from tests.unit.test_router_unanswered_money import BilledPipeline
from tests.unit.test_service_metrics import logs, value  # noqa: F401 (a fixture)

LIMIT = 4096  # ROUTER_MAX_REQUEST_BYTES


def _settings(**env: str) -> RouterSettings:
    base = {
        "MODEL_REPLICAS": "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50055",
        "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        "CACHEMESH_API_KEYS_FILE": "/dev/null",
    }
    return RouterSettings.from_env(Env({**base, **env}), load_model_table())


def _request(size: int) -> pb.CompleteRequest:
    """A sim-large request of exactly ``size`` bytes serialized."""
    request = build_request("", model="sim-large", max_tokens=16, request_id="r-1")
    text = "x" * (size - request.ByteSize())
    while True:
        request = build_request(text, model="sim-large", max_tokens=16, request_id="r-1")
        if request.ByteSize() <= size:
            break
        text = text[:-1]
    request.messages[-1].content[0].text += "x" * (size - request.ByteSize())
    assert request.ByteSize() == size
    return request


# the async stub is a type of the .pyi only
Served: TypeAlias = (
    "tuple[gateway_pb2_grpc.GatewayAsyncStub, CollectorRegistry, InMemorySpanExporter, io.StringIO]"
)


@pytest.fixture
async def served(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> AsyncIterator[Served]:
    """The Gateway servicer on a real gRPC server made as the router makes its own (its
    settings' options, the malformed-request guard and the tracing interceptor)."""
    out, lines = logs({})
    settings = _settings(ROUTER_MAX_REQUEST_BYTES=str(LIMIT))
    registry = new_registry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    servicer = gateway_servicer(
        BilledPipeline(),
        {KEY: "tenant-a"},
        metrics=RouterMetrics(registry, TenantLabels(4)),
        lines=lines,
        max_request_bytes=settings.max_request_bytes,
    )
    server = grpc.aio.server(
        interceptors=[MalformedRequests(), ServerTracing(provider.get_tracer("t"))],
        options=grpc_server_options(settings.server),
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    try:
        stub: gateway_pb2_grpc.GatewayAsyncStub = gateway_pb2_grpc.GatewayStub(channel)
        yield stub, registry, exporter, out
    finally:
        await channel.close()
        await server.stop(0)


async def _refusal(
    stub: gateway_pb2_grpc.GatewayAsyncStub, method: str, size: int
) -> grpc.aio.AioRpcError:
    metadata = (("authorization", f"Bearer {KEY}"),)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        if method == "Complete":
            await stub.Complete(_request(size), metadata=metadata, timeout=10)
        else:
            async for _ in stub.StreamComplete(_request(size), metadata=metadata, timeout=10):
                pass
    return refused.value


def test_the_transport_reads_twice_the_limit_and_no_more_than_every_service() -> None:
    settings = _settings(ROUTER_MAX_REQUEST_BYTES=str(LIMIT))
    assert settings.max_request_bytes == LIMIT
    assert settings.server.max_message_bytes == 2 * LIMIT
    default = _settings()
    assert default.max_request_bytes == 2 << 20  # a 200k-token prompt of ordinary text
    # what gRPC reads is every service's message limit (CACHEMESH_MAX_MESSAGE_BYTES), no more
    assert default.server.max_message_bytes == 4 << 20 == default.server.send_limit
    lowered = _settings(CACHEMESH_MAX_MESSAGE_BYTES=str(1 << 20))
    assert lowered.max_request_bytes == 512 << 10
    assert lowered.server.max_message_bytes == 1 << 20


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
async def test_a_request_over_the_limit_is_refused_by_the_router_naming_it(
    served: Served, method: str
) -> None:
    stub, registry, exporter, out = served
    error = await _refusal(stub, method, LIMIT + 1)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.details() or ""
    assert "4,097 bytes" in details and "limit of 4,096 bytes" in details, details
    assert "ROUTER_MAX_REQUEST_BYTES" in details and "larger than max" not in details

    # counted, logged and traced as any refused call: a stream's refusal reaches its caller
    # before the servicer's own end has counted it, so the count is looked at until it comes
    def errors() -> float:
        return value(
            registry,
            "cachemesh_router_errors_total",
            tenant="tenant-a",
            code="RESOURCE_EXHAUSTED",
            deadline="",
        )

    for _ in range(100):
        if errors():
            break
        await asyncio.sleep(0.01)
    assert errors() == 1
    lines = [json.loads(text) for text in out.getvalue().splitlines() if '"access"' in text]
    for _ in range(100):
        if lines:
            break
        await asyncio.sleep(0.01)
        lines = [json.loads(text) for text in out.getvalue().splitlines() if '"access"' in text]
    (line,) = lines
    assert line["status"] == "RESOURCE_EXHAUSTED" and line["tenant"] == "tenant-a"
    for _ in range(100):
        if exporter.get_finished_spans():
            break
        await asyncio.sleep(0.01)
    (span,) = exporter.get_finished_spans()
    attributes = span.attributes or {}
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert attributes["cachemesh.request_bytes"] == LIMIT + 1
    assert attributes["cachemesh.tenant"] == "tenant-a"


async def test_a_request_at_the_limit_is_answered(served: Served) -> None:
    stub, _registry, _exporter, _out = served
    metadata = (("authorization", f"Bearer {KEY}"),)
    reply = await stub.Complete(_request(LIMIT), metadata=metadata, timeout=10)
    assert reply.content[0].text == "The harbour at dawn."


async def test_only_a_request_over_twice_the_limit_gets_grpcs_own_refusal(served: Served) -> None:
    stub, _registry, _exporter, _out = served
    inside = await _refusal(stub, "Complete", 2 * LIMIT)
    assert "ROUTER_MAX_REQUEST_BYTES" in (inside.details() or "")
    beyond = await _refusal(stub, "Complete", 2 * LIMIT + 1)
    assert beyond.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (beyond.details() or "")
