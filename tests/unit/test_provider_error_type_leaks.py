"""A provider's error ``type`` / ``code`` is the provider's text like its message: it never
carries the replica's key out of the adapter (a refusal's message and reason, an interrupted
answer's error, a retry's span event, a log line), and it is taken only as a short identifier
(else "error"), which is all the classification reads. The replica is built as ``serve()``
builds it and calls the loopback provider servers of ``tests.providers``, whose error bodies
here name the key they were sent, as a proxy or an engine in front of a provider may."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.model.providers.config import Backend
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import Reply, WireServer, dumps

CLAUDE = "claude-haiku-4-5"
GPT = "gpt-4o-mini"
MODELS: dict[Backend, str] = {"anthropic": CLAUDE, "openai": GPT}
TRIES = 2  # max_retries 1: a retried failure is sent twice


def _key(backend: Backend) -> str:
    return f"sk-{backend}-loopback-0123456789abcdef"


def _leaked_type(backend: Backend) -> str:
    """An error type naming the key it was sent, short enough to pass as an identifier."""
    return f"forbidden_for_{_key(backend)}"


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


class Replica:
    """A provider replica on ``server``, its spans in ``spans``."""

    def __init__(self, server: WireServer, backend: Backend) -> None:
        server.reset()
        self.backend, self.model = backend, MODELS[backend]
        base = server.base + ("/v1" if backend == "openai" else "")
        settings = provider_settings(backend, base, _key(backend), max_retries=TRIES - 1)
        self.api = provider_replica(settings, [self.model], clock=lambda: 1000.0)
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self._tracer = provider.get_tracer("test")

    async def call(self) -> tuple[model_pb2.GenerateEnd | None, RequestError | None]:
        """One request: its end (an answer), else its refusal."""
        message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital?")])
        request = pb.CompleteRequest(model=self.model, max_tokens=16, messages=[message])
        call = model_pb2.GenerateRequest(tenant="t", model=self.model, request=request)
        with self._tracer.start_as_current_span("Generate"):
            try:
                chunks = [chunk async for chunk in self.api.generate(call, 10.0)]
            except RequestError as refused:
                return None, refused
        return chunks[-1].end, None

    def span_texts(self) -> str:
        return "\n".join(
            f"{span.status.description} {dict(span.attributes or {})} "
            + " ".join(f"{e.name} {dict(e.attributes or {})}" for e in span.events)
            for span in self.spans.get_finished_spans()
        )


@pytest.fixture
async def replicas(server: WireServer) -> AsyncIterator[Callable[[Backend], Replica]]:
    built: list[Replica] = []

    def build(backend: Backend) -> Replica:
        built.append(Replica(server, backend))
        return built[-1]

    yield build
    for replica in built:
        await replica.api.close()


def _error(backend: Backend, status: int, kind: str) -> Reply:
    if backend == "anthropic":
        return anthropic_wire.error(status, kind, "Forbidden")
    return openai_wire.error(status, kind, "Forbidden", code=kind)


def _broken_stream(backend: Backend, kind: str) -> Reply:
    """An answer whose stream breaks with an error event naming ``kind``, after one text."""
    model = MODELS[backend]
    if backend == "anthropic":
        usage = anthropic_wire.Usage(input_tokens=5, output_tokens=2)
        events = anthropic_wire.stream(model, ["Paris ", "is"], usage, error_after=1)
        body = anthropic_wire.error_body(kind, "the stream broke")
        return Reply(events=[*events[:-1], ("error", dumps(body))])
    events = openai_wire.stream(model, ["Paris ", "is"], None, cut_after=1)
    error = {"message": "the stream broke", "type": kind, "param": None, "code": kind}
    return Reply(events=[*events, (None, dumps({"error": error}))])


def _assert_no_key(backend: Backend, *texts: str) -> None:
    key = _key(backend)
    for fragment in (key, key[:8], key[-6:]):
        leaks = [text for text in texts if fragment in text]
        assert not leaks, f"{fragment!r} in {leaks}"


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
@pytest.mark.parametrize("status", [403, 500])
async def test_an_error_type_naming_the_key_reaches_no_status_reason_span_or_log(
    server: WireServer,
    replicas: Callable[[Backend], Replica],
    caplog: pytest.LogCaptureFixture,
    backend: Backend,
    status: int,
) -> None:
    replica = replicas(backend)
    server.script(backend, *[_error(backend, status, _leaked_type(backend))] * TRIES)
    with caplog.at_level(logging.DEBUG):
        end, refused = await replica.call()
    assert end is None and refused is not None and refused.code == Code.UNAVAILABLE, end
    assert f"{status} forbidden_for_[redacted]" in refused.message  # still says which error
    spans = replica.span_texts()
    if status == 500:  # retried once: its span event names the type
        assert "cachemesh.provider.retry" in spans and "forbidden_for_[redacted]" in spans
    _assert_no_key(backend, refused.message, refused.reason, spans, caplog.text)


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
async def test_an_error_event_naming_the_key_mid_answer_stays_out_of_the_end_and_log(
    server: WireServer,
    replicas: Callable[[Backend], Replica],
    caplog: pytest.LogCaptureFixture,
    backend: Backend,
) -> None:
    replica = replicas(backend)
    server.script(backend, _broken_stream(backend, _leaked_type(backend)))
    with caplog.at_level(logging.DEBUG):
        end, refused = await replica.call()
    assert refused is None and end is not None and end.interrupted, refused
    assert end.error == "forbidden_for_[redacted]", end.error  # its type, not its message
    _assert_no_key(backend, end.error, replica.span_texts(), caplog.text)


# not an identifier: too long, or words and punctuation (a proxy's own text, a message)
NOT_IDENTIFIERS = ["x" * 65, "no access for this key", "error\ninjected log line", "é"]


@pytest.mark.parametrize("kind", NOT_IDENTIFIERS, ids=["65-chars", "words", "newline", "accent"])
@pytest.mark.parametrize("backend", ["anthropic", "openai"])
async def test_an_error_type_that_is_no_short_identifier_is_shown_as_error(
    server: WireServer,
    replicas: Callable[[Backend], Replica],
    caplog: pytest.LogCaptureFixture,
    backend: Backend,
    kind: str,
) -> None:
    replica = replicas(backend)
    server.script(backend, _error(backend, 403, kind))
    with caplog.at_level(logging.DEBUG):
        end, refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, end  # a 403: the replica's
    # shown as "error"; the provider's message ("Forbidden") at DEBUG only
    assert "(403 error)" in refused.message, refused.message
    assert "error: Forbidden" not in refused.message
    assert kind not in refused.message + refused.reason + caplog.text

    server.script(backend, _broken_stream(backend, kind))
    end, refused = await replica.call()
    # its type shown as "error", its message the provider's: not the caller's to read
    assert end is not None and end.error == "error", (end, refused)


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
async def test_an_identifier_type_still_classifies(
    server: WireServer, replicas: Callable[[Backend], Replica], backend: Backend
) -> None:
    """The types the classification reads are identifiers: a 200 stream's overloaded error
    event before any token is still retried (and the retry answered)."""
    replica = replicas(backend)
    kind = "overloaded_error" if backend == "anthropic" else "server_error"
    if backend == "anthropic":
        body = anthropic_wire.overloaded_body()
        server.script(backend, Reply(events=[("error", dumps(body))]))
    else:
        server.script(backend, openai_wire.error_event(kind, kind, "overloaded"))
    end, refused = await replica.call()
    assert refused is None and end is not None and end.stop_reason == "end_turn", refused
    assert len(server.seen_by(backend)) == TRIES
