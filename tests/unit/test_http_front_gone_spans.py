"""A caller gone or stalled while its answer goes out: the request is counted as 499 (nginx's
code: no whole response reached the caller), and its server span says the same, with the
``error.type`` saying which (``client_gone``: it reset or closed the connection;
``client_stalled``: it kept the connection open and stopped reading, past
``HTTP_FRONT_WRITE_TIMEOUT_S``). The span said 200 (the head that went out) for a stalled
caller, of a whole answer or of a stream, while the metric and the README said 499."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cachemesh.v1 import gateway_pb2 as pb
from services.common.logs import JsonLines
from services.http_front import anthropic_api, app
from tests.unit.test_http_front_access_log import _access
from tests.unit.test_http_front_app import (
    CLAUDE_HEADERS,
    GPT_HEADERS,
    HI,
    FakeGateway,
    Flood,
    _answer,
    serving,
    small_window,
    stalled_post,
)
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

ROUTES = pytest.mark.parametrize(
    ("path", "headers"), [("/v1/messages", CLAUDE_HEADERS), ("/v1/chat/completions", GPT_HEADERS)]
)
# 3 MB of control characters: 18 MB of JSON (each one ``\u0001``), far more than the socket
# buffers between the front and a caller that reads little of it hold
BIG = _answer(pb.ContentBlock(text="\x01" * 3_000_000))


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(app, "build_tracer_provider", lambda *_, **__: provider)
    yield exporter
    provider.shutdown()


async def _request(base: str, path: str, headers: dict[str, str], stream: bool) -> socket.socket:
    """A POST on a raw socket with a small receive window (``stalled_post``); its head read."""
    streamed = b'"stream": true, ' if stream else b""
    body = b'{"model": "sim-large", "max_tokens": 50, ' + streamed + b'"messages": ' + HI
    sock = await stalled_post(base, path, headers, body)
    assert (await asyncio.get_running_loop().sock_recv(sock, 64)).startswith(b"HTTP/1.1 200")
    return sock


async def _served_span(spans: InMemorySpanExporter, path: str) -> ReadableSpan:
    """The request's server span, once it has ended (the front sends the rest meanwhile)."""
    async with asyncio.timeout(30):
        while True:
            ended = [s for s in spans.get_finished_spans() if s.name == f"POST {path}"]
            if ended:
                (span,) = ended
                return span
            await asyncio.sleep(0.02)


def _said(span: ReadableSpan) -> tuple[Any, Any]:
    attributes = span.attributes or {}
    return attributes.get("http.response.status_code"), attributes.get("error.type")


@ROUTES
@pytest.mark.parametrize("stream", [False, True], ids=["whole-answer", "stream"])
async def test_a_caller_that_stops_reading_has_a_499_span(
    tmp_path: Path, spans: InMemorySpanExporter, path: str, headers: dict[str, str], stream: bool
) -> None:
    """A whole answer larger than the socket buffers hold, or an endless stream (``Flood``)."""
    gateway = Flood() if stream else FakeGateway(answer=BIG)
    async with serving(tmp_path, gateway, HTTP_FRONT_WRITE_TIMEOUT_S="0.2") as served:
        sock = await _request(served.base, path, headers, stream=stream)
        try:  # reads nothing more, its connection open
            span = await _served_span(spans, path)
        finally:
            sock.close()
    assert _said(span) == (499, "client_stalled")  # (200, "client_stalled") before


@ROUTES
async def test_a_caller_that_resets_its_connection_mid_answer_has_a_499_span(
    tmp_path: Path, spans: InMemorySpanExporter, path: str, headers: dict[str, str]
) -> None:
    """The caller reads the head of a large whole answer and resets the connection (RST: a
    close with SO_LINGER 0) while the front is still writing it. The front's handler is
    cancelled in the middle of its writes (aiohttp's handler cancellation) or its next write
    fails: either way the span says client_gone, 499 (it said 200, the head's, before; no
    write timeout is near: the default 30 s)."""
    gateway = FakeGateway(answer=BIG)
    async with serving(tmp_path, gateway) as served:
        sock = await _request(served.base, path, headers, stream=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # an RST, the rest of the 18 MB answer unsent
        span = await _served_span(spans, path)
    assert _said(span) == (499, "client_gone")


def test_the_reset_test_resets() -> None:
    """What the reset test stands on: a close with SO_LINGER 0 resets the connection (the
    other side's read fails with ECONNRESET), it does not end it with a FIN."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with accepted:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            accepted.settimeout(5)
            with pytest.raises(ConnectionResetError):
                accepted.recv(16)


async def test_a_5xx_refusal_its_caller_does_not_take_is_499_in_its_span_and_access_line(
    tmp_path: Path,
    spans: InMemorySpanExporter,
    small_send_buffers: None,
    capsys: pytest.CaptureFixture[str],
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal of the front's own (here its 500 to a bug while the body is parsed) that the
    caller does not take (pipelined requests, none of whose answers it reads): the request is
    counted as 499, and so its span's status code and the front's access line say (they said
    499 and 500 beside each other: the line was written before the refusal went out). The
    span still ends in ERROR, naming the 500 not delivered: the front did fail."""

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug in the translation")

    monkeypatch.setattr(anthropic_api, "parse_request", broken)
    body = b'{"model": "sim-large", "max_tokens": 50, "messages": ' + HI
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_WRITE_TIMEOUT_S="0.2") as served:
        sock, host = await small_window(served.base)
        loop = asyncio.get_running_loop()
        head = f"POST /v1/messages HTTP/1.1\r\nhost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in {**CLAUDE_HEADERS, "content-length": len(body)}.items()
        )
        try:  # ~300 KB of refusals: more than the buffers hold, so one write waits, past 0.2 s
            with contextlib.suppress(ConnectionError):  # the front drops the connection then
                await loop.sock_sendall(sock, (head.encode() + b"\r\n" + body) * 500)
            async with asyncio.timeout(30):
                while True:
                    if [s for s in spans.get_finished_spans() if _said(s)[0] == 499]:
                        break
                    await asyncio.sleep(0.02)
        finally:
            sock.close()
    (stalled,) = [s for s in spans.get_finished_spans() if _said(s)[0] == 499]
    assert _said(stalled) == (499, "client_stalled")
    assert stalled.status.status_code is StatusCode.ERROR
    assert "HTTP 500, not delivered" in (stalled.status.description or "")
    lines = _access(capsys.readouterr().err)
    assert [line["http_status"] for line in lines].count(499) == 1, lines[-3:]
    (line,) = [line for line in lines if line["http_status"] == 499]
    assert line["status"] == "INTERNAL"  # the refusal's, as the metric's 499 is its delivery
    answered = [s for s in spans.get_finished_spans() if _said(s)[0] == 500]
    assert len(lines) == len(answered) + 1  # one line for each refusal, the stalled one too
