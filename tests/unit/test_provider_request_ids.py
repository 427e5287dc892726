"""The provider's id of a call (Anthropic's ``request-id`` response header, OpenAI's
``x-request-id``: what an operator hands the provider about a customer's complaint) is on the
replica's span and on its log line, for an answer, a provider's error, a retry and a stream
cut midway; a header that is no short identifier, or that holds the replica's key, is not
shown. The official SDKs call the loopback servers, which send the header as the real APIs
do (a fresh id each answer)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.env import Env
from services.common.errors import RequestError
from services.model.providers.api import REQUEST_ID_ATTRIBUTE, ProviderApi
from services.model.providers.config import Backend
from services.model.providers.failures import REQUEST_ID_FIELD
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings, service_log
from tests.providers.wire_server import REQUEST_ID_HEADERS, Reply, WireServer

KEYS: dict[Backend, str] = {
    "anthropic": "sk-ant-api03-requestidtest0123456789abcdef",
    "openai": "sk-proj-requestidtest0123456789abcdef",
}
MODELS: dict[Backend, str] = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4-1"}
BACKENDS: tuple[Backend, ...] = ("anthropic", "openai")


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """The replica's log lines (json, DEBUG); the root logger as it was afterwards."""
    yield from service_log(Env({"CACHEMESH_LOG_LEVEL": "DEBUG"}))


def _replica_call(
    server: WireServer, backend: Backend, retries: int = 0
) -> tuple[ProviderApi, model_pb2.GenerateRequest, InMemorySpanExporter, Tracer]:
    """A replica built as ``serve()`` builds it, one Generate for it, and a tracer whose ended
    spans the exporter keeps."""
    base = server.base + ("/v1" if backend == "openai" else "")
    settings = provider_settings(backend, base, KEYS[backend], max_retries=retries)
    api = provider_replica(settings, [MODELS[backend]])
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital?")])
    call = model_pb2.GenerateRequest(
        tenant="t",
        model=MODELS[backend],
        request=pb.CompleteRequest(model=MODELS[backend], max_tokens=32, messages=[message]),
    )
    memory = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    return api, call, memory, tracer_provider.get_tracer("test")


def _call(
    server: WireServer, backend: Backend, *, retries: int = 0
) -> tuple[list[model_pb2.GenerateChunk], RequestError | None, ReadableSpan]:
    """One Generate through a replica built as ``serve()`` builds it, inside a span of its
    own: its chunks, its refusal (None: none) and its span."""
    api, call, memory, tracer = _replica_call(server, backend, retries)
    chunks: list[model_pb2.GenerateChunk] = []
    refused: RequestError | None = None

    async def run() -> None:
        nonlocal refused
        try:
            with tracer.start_as_current_span("Generate"):
                async for chunk in api.generate(call, 10.0):
                    chunks.append(chunk)
        except RequestError as error:
            refused = error
        finally:
            await api.close()

    asyncio.run(run())
    (span,) = memory.get_finished_spans()
    return chunks, refused, span


def _lines(logged: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logged.getvalue().splitlines() if line.strip()]


def _ids_logged(logged: io.StringIO) -> list[str]:
    return [line[REQUEST_ID_FIELD] for line in _lines(logged) if REQUEST_ID_FIELD in line]


def _error(backend: Backend, status: int, kind: str, message: str, **extra: Any) -> Reply:
    if backend == "anthropic":
        return anthropic_wire.error(status, kind, message, **extra)
    return openai_wire.error(status, kind, message, **extra)


def _cut_midway(backend: Backend) -> Reply:
    """The default answer's stream, cut after its first text (no end, no usage)."""
    if backend == "anthropic":
        events = anthropic_wire.stream(
            MODELS[backend], ["Paris is ", "the capital"], anthropic_wire.Usage(10, output_tokens=3)
        )
        return Reply(events=events[:3], cut=True)  # message_start, block start, one delta
    events = openai_wire.stream(MODELS[backend], ["Paris is ", "the capital"], None)
    return Reply(events=events[:2], cut=True)


def _last_seen(server: WireServer, backend: Backend) -> str:
    seen = server.seen_by(backend)[-1]
    assert seen.request_id.startswith("req_")
    return seen.request_id


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_answers_request_id_is_on_its_span_and_line(
    server: WireServer, logged: io.StringIO, backend: Backend
) -> None:
    server.reset()
    chunks, refused, span = _call(server, backend)
    assert refused is None and chunks[-1].end.stop_reason == "end_turn"
    request_id = _last_seen(server, backend)
    assert span.attributes is not None
    assert span.attributes[REQUEST_ID_ATTRIBUTE] == request_id
    assert _ids_logged(logged) == [request_id]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_provider_errors_request_id_is_on_its_span_and_line(
    server: WireServer, logged: io.StringIO, backend: Backend
) -> None:
    server.reset()
    server.script(backend, _error(backend, 400, "invalid_request_error", "messages: bad"))
    _, refused, span = _call(server, backend)
    assert refused is not None and refused.code.name == "INVALID_ARGUMENT", refused
    request_id = _last_seen(server, backend)
    assert span.attributes is not None
    assert span.attributes[REQUEST_ID_ATTRIBUTE] == request_id
    assert _ids_logged(logged) == [request_id]
    assert request_id not in refused.message  # the operator's, not the caller's


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_retried_tries_ids_are_each_on_the_span(
    server: WireServer, logged: io.StringIO, backend: Backend
) -> None:
    """The retried try's id on its retry event and line; the answering try's on the span."""
    server.reset()
    server.script(backend, _error(backend, 500, "api_error", "boom", headers={"retry-after": "0"}))
    chunks, refused, span = _call(server, backend, retries=1)
    assert refused is None and chunks[-1].end.stop_reason == "end_turn"
    failed, answered = (s.request_id for s in server.seen_by(backend))
    assert failed != answered
    assert span.attributes is not None
    assert span.attributes[REQUEST_ID_ATTRIBUTE] == answered
    (retry,) = [e for e in span.events if e.name == "cachemesh.provider.retry"]
    assert retry.attributes is not None and retry.attributes[REQUEST_ID_ATTRIBUTE] == failed
    assert _ids_logged(logged) == [failed, answered]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_cut_midways_request_id_is_on_its_span_and_line(
    server: WireServer, logged: io.StringIO, backend: Backend
) -> None:
    server.reset()
    server.script(backend, _cut_midway(backend))
    chunks, refused, span = _call(server, backend)
    assert refused is None and chunks[-1].end.interrupted
    request_id = _last_seen(server, backend)
    assert span.attributes is not None
    assert span.attributes[REQUEST_ID_ATTRIBUTE] == request_id
    broke = [line for line in _lines(logged) if "broke mid-answer" in line["msg"]]
    assert [line[REQUEST_ID_FIELD] for line in broke] == [request_id]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["key", "not an id", "x" * 129])
def test_a_header_that_is_no_id_or_holds_the_key_is_not_shown(
    server: WireServer, logged: io.StringIO, backend: Backend, shape: str
) -> None:
    """A proxy may put anything there: the replica's key echoed, a text, a long run."""
    value = KEYS[backend] if shape == "key" else shape
    header = {REQUEST_ID_HEADERS[backend]: value}
    server.reset()
    server.script(backend, _error(backend, 400, "invalid_request_error", "bad", headers=header))
    _, refused, span = _call(server, backend)
    assert refused is not None
    assert span.attributes is not None and REQUEST_ID_ATTRIBUTE not in span.attributes
    assert _ids_logged(logged) == []
    assert value not in logged.getvalue()


STALL_S = 30.0  # the stream's pause after its first text: the call is left before it ends


def _stalled_after_first_text(backend: Backend) -> Reply:
    """The default answer's stream, pausing after its first text (the start has gone out)."""
    if backend == "anthropic":
        events = anthropic_wire.stream(
            MODELS[backend], ["Paris is ", "the capital"], anthropic_wire.Usage(10, output_tokens=3)
        )
        return Reply(events=events, pauses={3: STALL_S})  # before the second delta
    events = openai_wire.stream(MODELS[backend], ["Paris is ", "the capital"], None)
    return Reply(events=events, pauses={2: STALL_S})


def _left_after_start(
    server: WireServer, backend: Backend, how: str
) -> tuple[list[model_pb2.GenerateChunk], ReadableSpan]:
    """One Generate the caller leaves after its start chunk, as the router does for a client
    gone or a stall handed over: ``aclose`` closes the generator between chunks, ``cancel``
    cancels the task reading it while the replica waits for the provider's next event."""
    api, call, memory, tracer = _replica_call(server, backend)
    chunks: list[model_pb2.GenerateChunk] = []

    async def read(started: asyncio.Event) -> None:
        with tracer.start_as_current_span("Generate"):
            generator = api.generate(call, 60.0)
            try:
                async for chunk in generator:
                    chunks.append(chunk)
                    if chunk.WhichOneof("part") == "start":
                        if how == "aclose":
                            break
                        started.set()  # the next wait is for the stalled event
            finally:
                await generator.aclose()

    async def run() -> None:
        started = asyncio.Event()
        reader = asyncio.create_task(read(started))
        try:
            if how == "cancel":
                await started.wait()
                await asyncio.sleep(0.2)  # the replica waits for the provider's next event
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        finally:
            await api.close()

    asyncio.run(run())
    (span,) = memory.get_finished_spans()
    return chunks, span


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_call_left_after_its_start_has_its_request_id_on_its_span(
    server: WireServer, backend: Backend, how: str
) -> None:
    """The router closes (a client gone) or cancels (its stall hand-over) a replica's Generate
    under way: the provider's id of that call is on the span all the same."""
    server.reset()
    server.script(backend, _stalled_after_first_text(backend))
    chunks, span = _left_after_start(server, backend, how)
    assert [c.WhichOneof("part") for c in chunks][:1] == ["start"]
    assert not any(c.WhichOneof("part") == "end" for c in chunks)
    request_id = _last_seen(server, backend)
    assert span.attributes is not None
    assert span.attributes.get(REQUEST_ID_ATTRIBUTE) == request_id
