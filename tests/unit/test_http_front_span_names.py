"""The front's server span is named by the matched route's pattern, not the request's path:
a path holds the caller's free text (``GET /v1/models/<anything>``, even without a key), and
span names must be a bounded set (backends index and group by them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.http_front import app
from tests.unit.test_http_front_app import KEY, FakeGateway, serving


async def test_the_server_span_is_named_by_the_route_not_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(app, "build_tracer_provider", lambda *_, **__: provider)
    async with serving(tmp_path, FakeGateway()) as front, aiohttp.ClientSession() as session:
        for name, headers in (
            ("no-such-model-1a2b", {}),  # unauthenticated
            ("sim-large", {"Authorization": f"Bearer {KEY}"}),
        ):
            async with session.get(f"{front.base}/v1/models/{name}", headers=headers) as reply:
                await reply.read()
        async with session.get(f"{front.base}/v1/models", headers=headers) as reply:
            await reply.read()
    served: list[Any] = [s for s in spans.get_finished_spans() if s.name.startswith("GET")]
    assert [s.name for s in served] == ["GET /v1/models/{model}"] * 2 + ["GET /v1/models"]
    assert [s.attributes["http.route"] for s in served] == [
        "/v1/models/{model}",
        "/v1/models/{model}",
        "/v1/models",
    ]
    assert "1a2b" not in "".join(s.name for s in spans.get_finished_spans())
