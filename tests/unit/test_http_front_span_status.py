"""The front's server span of an answer the front or what is behind it failed (5xx) is an
ERROR, as the OpenTelemetry HTTP conventions have a server's span; a 4xx (the caller's fault)
is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.http_front import app
from tests.unit.test_http_front_app import CLAUDE_HEADERS, HI, FakeGateway, serving


@pytest.mark.parametrize(
    ("code", "http", "status"),
    [
        (grpc.StatusCode.UNAVAILABLE, 529, StatusCode.ERROR),  # Anthropic's overloaded,
        (grpc.StatusCode.INTERNAL, 500, StatusCode.ERROR),
        (grpc.StatusCode.INVALID_ARGUMENT, 400, StatusCode.UNSET),
    ],
)
async def test_a_5xx_answers_span_is_an_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: grpc.StatusCode,
    http: int,
    status: StatusCode,
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(app, "build_tracer_provider", lambda *_, **__: provider)
    gateway = FakeGateway(refuse=(code, "no", ()))
    body = b'{"model": "sim-large", "max_tokens": 50, "messages": ' + HI
    async with (
        serving(tmp_path, gateway) as front,
        aiohttp.ClientSession() as session,
        session.post(f"{front.base}/v1/messages", data=body, headers=CLAUDE_HEADERS) as reply,
    ):
        await reply.read()
        assert reply.status == http
    served: list[Any] = [s for s in spans.get_finished_spans() if s.name.startswith("POST")]
    (span,) = served
    assert span.attributes["http.response.status_code"] == http
    assert span.status.status_code == status
    assert span.attributes["error.type"]  # the error's kind, as before
