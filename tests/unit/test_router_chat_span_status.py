"""The ``chat <model>`` span of a model call says how it ended: a call cut mid-answer (its
replica died before another one answered) is an ERROR with its ``error.type``; a call the
caller cancelled stays UNSET, as ``rpc_tracing`` leaves a caller's cancel."""

from __future__ import annotations

import contextlib

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.router.dependencies import CallFailed, Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeModels,
    FakeStream,
    Rig,
    _request,
    _settings,
)
from tests.unit.test_router_unanswered_money import CutFirst, HeldModels


def _traced(rig: Rig) -> tuple[Pipeline, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    tracer = provider.get_tracer("test")
    pipeline = Pipeline(deps, TABLE, TOKENIZER, tracer, _settings(), router, clock=rig.clock)
    return pipeline, exported


def _chats(exported: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exported.get_finished_spans() if s.name.startswith("chat ")]


async def test_a_cut_attempts_chat_span_is_an_error_and_the_retry_is_not() -> None:
    rig = Rig(models=CutFirst())
    pipeline, exported = _traced(rig)
    chunks = [c async for c in pipeline.run("tenant-a", _request(), streamed=False)]
    await pipeline.drain()
    assert chunks[-1].WhichOneof("part") == "end"
    cut, answered = _chats(exported)
    assert cut.status.status_code == StatusCode.ERROR
    assert cut.attributes is not None and cut.attributes["error.type"] == "replica_cut"
    assert answered.status.status_code == StatusCode.UNSET
    assert answered.attributes is not None and "error.type" not in answered.attributes
    assert answered.attributes["gen_ai.usage.output_tokens"] == 3


async def test_a_cancelled_calls_chat_span_stays_unset() -> None:
    rig = Rig(models=HeldModels())
    pipeline, exported = _traced(rig)
    async with contextlib.aclosing(pipeline.run("tenant-a", _request())) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves
    await pipeline.drain()
    (chat,) = _chats(exported)
    assert chat.status.status_code == StatusCode.UNSET
    assert chat.attributes is not None and "error.type" not in chat.attributes


class NoStart(FakeModels):
    """Each replica ends its stream without a start (an empty answer, or a text first)."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        return FakeStream([model_pb2.GenerateChunk(text="no start first")])


async def test_a_replica_sending_no_start_ends_its_chat_span_as_an_error() -> None:
    rig = Rig(models=NoStart())
    pipeline, exported = _traced(rig)
    with pytest.raises(RequestError) as raised:
        async for _ in pipeline.run("tenant-a", _request(), streamed=False):
            pass
    await pipeline.drain()
    assert raised.value.code == Code.UNAVAILABLE
    chats = _chats(exported)
    assert chats
    for chat in chats:  # a replica's fault, not the request's: as record_failure marks it
        assert chat.status.status_code == StatusCode.ERROR
        assert chat.status.description == "UNAVAILABLE"
        assert chat.attributes is not None and chat.attributes["error.type"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (Code.INVALID_ARGUMENT, "messages.0.content: unsupported block (the provider's 400)"),
        (Code.RESOURCE_EXHAUSTED, "prompt is too long: 210000 tokens > 200000 maximum"),
    ],
)
async def test_a_replicas_refusal_of_the_request_keeps_its_chat_span_unset(
    code: Code, message: str
) -> None:
    """A replica refusing the request as the caller's fault (a provider's 400, a prompt over
    the context window) is no server error: its span says the refusal's ``error.type`` and
    stays UNSET, as the front's span of a 4xx does; it is not an ERROR a dashboard counts."""
    rig = Rig(models=FakeModels(failing={"large-1", "large-2"}, failure=CallFailed(code, message)))
    pipeline, exported = _traced(rig)
    with pytest.raises(RequestError) as raised:
        async for _ in pipeline.run("tenant-a", _request(), streamed=False):
            pass
    await pipeline.drain()
    assert raised.value.code == code
    (chat,) = _chats(exported)  # the request's own fault: no other replica is asked
    assert chat.status.status_code == StatusCode.UNSET, chat.status
    assert chat.attributes is not None and chat.attributes["error.type"] == code.name
    assert not [e for e in chat.events if e.name == "exception"]  # no stack trace of a 400
