"""A caller gone or stalled while its answer goes out: the request is counted as 499 (nginx's
code: no whole response reached the caller), and its server span says the same, with the
``error.type`` saying which (``client_gone``: it reset or closed the connection;
``client_stalled``: it kept the connection open and stopped reading, past
``HTTP_FRONT_WRITE_TIMEOUT_S``). The span said 200 (the head that went out) for a stalled
caller, of a whole answer or of a stream, while the metric and the README said 499."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from services.http_front import app
from tests.unit.test_http_front_app import (
    CLAUDE_HEADERS,
    GPT_HEADERS,
    HI,
    FakeGateway,
    Flood,
    _answer,
    serving,
    stalled_post,
)

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
async def test_a_caller_that_stops_reading_a_whole_answer_has_a_499_span(
    tmp_path: Path, spans: InMemorySpanExporter, path: str, headers: dict[str, str]
) -> None:
    gateway = FakeGateway(answer=BIG)
    async with serving(tmp_path, gateway, HTTP_FRONT_WRITE_TIMEOUT_S="0.2") as served:
        sock = await _request(served.base, path, headers, stream=False)
        try:  # reads nothing more, its connection open
            span = await _served_span(spans, path)
        finally:
            sock.close()
    assert _said(span) == (499, "client_stalled")  # (200, "client_stalled") before


@ROUTES
async def test_a_caller_that_stops_reading_a_stream_has_a_499_span(
    tmp_path: Path, spans: InMemorySpanExporter, path: str, headers: dict[str, str]
) -> None:
    flood = Flood()
    async with serving(tmp_path, flood, HTTP_FRONT_WRITE_TIMEOUT_S="0.2") as served:
        sock = await _request(served.base, path, headers, stream=True)
        try:
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
