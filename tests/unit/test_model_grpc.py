"""The Model servicer over loopback gRPC, behind the tracing and internal-auth interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.auth import InternalAuthInterceptor, internal_metadata
from services.common.models import load_model_table
from services.common.telemetry import server_interceptors
from services.common.tokens import Tokenizer, load_cl100k
from services.model.api import ModelApi
from services.model.engine import SimEngine
from services.model.kv_cache import KvBlockCache
from services.model.servicer import ModelService

TOKEN = "internal-token-for-tests-0123456789"


class GatedSleep:
    """Returns at once, except that the decode sleeps wait for ``gate`` when ``hold`` is set."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.hold = False
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()  # a decode sleep waits for the gate
        self.cancelled = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.hold and len(self.calls) > 1:
            self.waiting.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise


@dataclass
class Harness:
    stub: model_pb2_grpc.ModelAsyncStub
    spans: InMemorySpanExporter
    sleep: GatedSleep
    service: ModelService


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@pytest.fixture
async def harness(tokenizer: Tokenizer) -> AsyncIterator[Harness]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    sleep = GatedSleep()
    table = load_model_table()
    engine = SimEngine(
        models={"sim-small": table.models["sim-small"]},
        replica_id="replica-a",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(1000),
        time_scale=1.0,
        sleep=sleep,
    )
    service = ModelService("replica-a", ModelApi(engine))
    server = grpc.aio.server(
        interceptors=[*server_interceptors(provider), InternalAuthInterceptor(TOKEN)]
    )
    model_pb2_grpc.add_ModelServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(model_pb2_grpc.ModelStub(channel), spans, sleep, service)
    finally:
        await channel.close()
        await server.stop(None)
        provider.shutdown()


def _generate(
    tenant: str = "tenant-a", model: str = "sim-small", max_tokens: int = 500
) -> model_pb2.GenerateRequest:
    request = pb.CompleteRequest(
        model=model,
        system=[pb.ContentBlock(text="You answer questions about caches. " * 20)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Why cache?")])],
        max_tokens=max_tokens,
    )
    return model_pb2.GenerateRequest(tenant=tenant, model=model, request=request)


async def _chunks(h: Harness, request: model_pb2.GenerateRequest) -> list[model_pb2.GenerateChunk]:
    call = h.stub.Generate(request, metadata=internal_metadata(TOKEN))
    return [chunk async for chunk in call]


async def test_streams_start_text_end(harness: Harness, tokenizer: Tokenizer) -> None:
    chunks = await _chunks(harness, _generate())
    kinds = [chunk.WhichOneof("part") for chunk in chunks]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"text"}
    start, end = chunks[0].start, chunks[-1].end
    text = "".join(chunk.text for chunk in chunks[1:-1])
    assert start.replica == "replica-a"
    assert start.prompt_tokens > 100 and start.kv_cached_tokens == 0
    # its prefill queue serves calls' turns by tenant: the router predicts its queue so
    assert start.HasField("tenant_fair_queue") and start.tenant_fair_queue
    assert text.startswith("[simulated sim-small answer]")
    assert end.output_tokens == tokenizer.count(text)
    assert end.stop_reason == "end_turn"

    again = await _chunks(harness, _generate())
    assert again[0].start.kv_cached_tokens == (start.prompt_tokens - 1) // 16 * 16
    assert again[1:] == chunks[1:]


async def test_server_span_carries_gen_ai_attributes(harness: Harness) -> None:
    chunks = await _chunks(harness, _generate(max_tokens=9))
    (span,) = harness.spans.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "sim-small"
    assert attributes["gen_ai.usage.input_tokens"] == chunks[0].start.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == 9
    assert attributes["cachemesh.replica"] == "replica-a"
    assert attributes["cachemesh.kv_cached_tokens"] == 0
    assert attributes["cachemesh.queue_wait_ms"] == 0.0  # no prefill ahead: no wait
    assert chunks[-1].end.stop_reason == "max_tokens"


async def test_no_credential_is_unauthenticated(harness: Harness) -> None:
    for metadata in [(), internal_metadata("wrong-token-of-enough-length")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [chunk async for chunk in harness.stub.Generate(_generate(), metadata=metadata)]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.sleep.calls == []


@pytest.mark.parametrize(
    ("request_", "code", "names"),
    [
        (_generate(tenant=""), grpc.StatusCode.INVALID_ARGUMENT, "tenant"),
        (_generate(model="sim-large"), grpc.StatusCode.INVALID_ARGUMENT, "serves: sim-small"),
        (_generate(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ],
)
async def test_bad_input_codes_over_the_wire(
    harness: Harness, request_: model_pb2.GenerateRequest, code: grpc.StatusCode, names: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _chunks(harness, request_)
    assert caught.value.code() == code
    assert names in (caught.value.details() or "")
    assert harness.sleep.calls == []  # refused before any simulated work


async def test_unavailable_until_the_engine_is_attached(harness: Harness) -> None:
    harness.service._api = None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _chunks(harness, _generate())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_cancelled_call_stops_the_engine(harness: Harness) -> None:
    harness.sleep.hold = True
    call = harness.stub.Generate(_generate(), metadata=internal_metadata(TOKEN))
    first = await call.read()
    assert isinstance(first, model_pb2.GenerateChunk) and first.HasField("start")
    # cancelled once the engine waits in its decode (before, on a loaded machine the cancel
    # now and then reached the handler still sending the start, and the gate never saw it)
    await asyncio.wait_for(harness.sleep.waiting.wait(), timeout=30)
    call.cancel()
    await asyncio.wait_for(harness.sleep.cancelled.wait(), timeout=30)
    assert len(harness.sleep.calls) == 2  # prefill, then the first decode sleep that was cut
