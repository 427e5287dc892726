"""A stream that fails after its head went out (the model replica dies mid-answer) ends with an
error event, and is counted and traced with that error, not as the 200 its head said."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.http_front import app
from tests.unit.test_http_front_app import ASK, CLAUDE_HEADERS, KEY, FakeGateway, serving


async def test_a_stream_cut_by_the_gateway_is_counted_and_traced_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(app, "build_tracer_provider", lambda *_, **__: provider)
    cut = "the model replica went away"
    async with serving(tmp_path, FakeGateway(cut=cut)) as front:
        claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY, max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as claude_error:
            async with claude.messages.stream(
                model="sim-large", max_tokens=50, messages=ASK
            ) as stream:
                await stream.get_final_message()
        await claude.close()
        gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY, max_retries=0)
        chunks = await gpt.chat.completions.create(model="sim-large", messages=ASK, stream=True)
        with pytest.raises(openai.APIError) as gpt_error:
            _ = [chunk async for chunk in chunks]
        await gpt.close()
        async with aiohttp.ClientSession() as session, session.get(front.metrics) as reply:
            metrics = await reply.text()
    assert cut in str(claude_error.value) and cut in str(gpt_error.value)
    counted = [
        line.split("{", 1)[1]
        for line in metrics.splitlines()
        if line.startswith("cachemesh_http_front_requests_total{") and not line.endswith(" 0.0")
    ]  # the failure series at 0 from the start (``metrics.SERVER_FAILURES``) left out
    # each API's status for UNAVAILABLE: Anthropic's overloaded 529, OpenAI's 503
    assert sorted(counted) == [
        'api="anthropic",route="/v1/messages",status="529"} 1.0',
        'api="openai",route="/v1/chat/completions",status="503"} 1.0',
    ]
    served: list[Any] = [s for s in spans.get_finished_spans() if s.name.startswith("POST")]
    assert [s.attributes.get("error.type") for s in served] == ["overloaded", "overloaded"]
    # the server's failure after the 200 went out: an ERROR, as a 5xx before it would be; the
    # status code on the span stays the one the caller received
    assert [s.attributes["http.response.status_code"] for s in served] == [200, 200]
    assert [(s.status.status_code, s.status.description) for s in served] == [
        (StatusCode.ERROR, "HTTP 529 after the 200's head: the stream ended in its error"),
        (StatusCode.ERROR, "HTTP 503 after the 200's head: the stream ended in its error"),
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_caller_that_disconnects_is_traced_as_gone_not_as_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """The caller hangs up while its answer is awaited: aiohttp cancels the handler, and the
    CancelledError passed every except clause, so the server span ended with no status code
    and no error.type while the front's metric counted a 499. Now the span says so too."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(app, "build_tracer_provider", lambda *_, **__: provider)
    gateway = FakeGateway(hold=asyncio.Event())  # the answer never comes
    async with serving(tmp_path, gateway) as front:
        body = {"model": "sim-large", "max_tokens": 50, "messages": ASK, "stream": stream}
        async with aiohttp.ClientSession() as session:
            reply = asyncio.ensure_future(
                session.post(f"{front.base}/v1/messages", json=body, headers=CLAUDE_HEADERS)
            )
            await asyncio.wait_for(gateway.arrived.wait(), 10)
            reply.cancel()  # the caller goes away (its connection closed)
            with contextlib.suppress(asyncio.CancelledError):
                await reply
        served: list[Any] = []
        for _ in range(500):  # the handler's cancel, then the span's end
            served = [s for s in spans.get_finished_spans() if s.name.startswith("POST")]
            if served:
                break
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session, session.get(front.metrics) as metrics:
            counted = await metrics.text()
    (span,) = served
    assert span.attributes["http.response.status_code"] == 499
    assert span.attributes["error.type"] == "client_gone"
    assert 'route="/v1/messages",status="499"} 1.0' in counted
