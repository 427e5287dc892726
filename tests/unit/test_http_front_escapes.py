"""The HTTP front's size limit is the Gateway's, measured as the router measures a request
(``CompleteRequest.ByteSize()``), not on the body's JSON: a body whose text is written as
``\\uXXXX`` escapes (as Python's ``json.dumps`` and ``requests``' ``json=`` write anything not
ASCII) is two to six times the request it holds."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from services.http_front import anthropic_api, app, bodies, fields
from services.http_front.errors import Api
from tests.unit.test_http_front_app import (
    CLAUDE_HEADERS,
    GPT_HEADERS,
    KEY,
    FakeGateway,
    Front,
    _raw,
    serving,
)

LIMIT = 64 * 1024  # HTTP_FRONT_MAX_BODY_BYTES here (the Gateway's default is 2 MiB)
# prose of 2- and 3-byte UTF-8 characters: ``\\uXXXX`` (6 bytes) each in ensure_ascii JSON
PROSE = "Быстрая коричневая лиса прыгает через ленивую собаку; 東京の夜は静かです。 "


def _request(path: str, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim-large", "messages": [{"role": "user", "content": text}]}
    if path == "/v1/messages":
        body["max_tokens"] = 5
    return body


def _prose(size: int) -> str:
    """Prose whose UTF-8 is ``size`` bytes (cut at a character)."""
    text = PROSE * (size // len(PROSE.encode()) + 1)
    return text.encode()[:size].decode(errors="ignore")


def _fitting(path: str, under: int) -> str:
    """Prose whose Gateway request (what the front sends, as the router measures it) is just
    under ``under`` bytes."""
    text = _prose(under)
    sent = pb.CompleteRequest(
        model="sim-large", max_tokens=5, messages=[pb.Message(content=[pb.ContentBlock(text=text)])]
    )
    return _prose(under - (sent.ByteSize() - len(text.encode())) - 64)


@pytest.fixture
async def front(tmp_path: Path) -> Any:
    fake = FakeGateway()
    async with serving(tmp_path, fake, HTTP_FRONT_MAX_BODY_BYTES=str(LIMIT)) as served:
        yield Front(served.base, served.stop, served.metrics, fake)


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/v1/messages", CLAUDE_HEADERS), ("/v1/chat/completions", GPT_HEADERS)],
)
async def test_escaped_prose_the_gateway_takes_is_passed_on(
    front: Front, path: str, headers: dict[str, str]
) -> None:
    """It was a 413 "request body too large (170,xxx bytes): at most 65,536 bytes" for a request
    of ~65,400 bytes."""
    text = _fitting(path, LIMIT)
    body = json.dumps(_request(path, text)).encode()  # ensure_ascii, as json.dumps writes it
    assert len(body) > 2 * LIMIT
    status, reply = await _raw(front, path, body, headers)
    assert status == 200, reply
    received = front.gateway.received
    assert received is not None and received.messages[0].content[0].text == text
    assert LIMIT - 1024 < received.ByteSize() <= LIMIT


def _measured(message: str) -> int:
    """The request's size the refusal names: "request too large: 66,123 bytes as ..."."""
    found = re.search(r"request too large: ([\d,]+) bytes as the Gateway's request", message)
    assert found is not None, message
    return int(found.group(1).replace(",", ""))


async def test_a_request_over_the_limit_is_refused_naming_its_size_and_the_limit(
    front: Front,
) -> None:
    """Both SDKs get their 413 (its error type, x-should-retry: false) with the request's
    size as the router measures it and the limit; the Gateway is not called."""
    text = _prose(LIMIT + 1000)
    claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY, max_retries=0)
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY, max_retries=0)
    async with claude, gpt:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await claude.messages.create(
                model="sim-large", max_tokens=5, messages=[{"role": "user", "content": text}]
            )
        with pytest.raises(openai.APIStatusError) as gpt_refused:
            await gpt.chat.completions.create(
                model="sim-large", messages=[{"role": "user", "content": text}]
            )
    assert refused.value.status_code == 413 and gpt_refused.value.status_code == 413
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "request_too_large"
    gpt_error = gpt_refused.value.body  # the SDK's body is the error object
    assert gpt_error["code"] == "request_too_large"  # type: ignore[index]
    for said in (error["message"], gpt_error["message"]):  # type: ignore[index]
        assert LIMIT < _measured(said) < LIMIT + 1200
        assert f"at most {LIMIT:,} bytes" in said and "HTTP_FRONT_MAX_BODY_BYTES" in said
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert front.gateway.calls == 0


async def test_a_body_over_the_escaped_bound_is_refused_before_it_is_read(front: Front) -> None:
    """Its announced length, or (chunked) once it is over: six times the limit."""
    most = 6 * LIMIT
    body = json.dumps(_request("/v1/messages", "\x01" * (most // 6 + 100))).encode()
    assert len(body) > most
    status, reply = await _raw(front, "/v1/messages", body, CLAUDE_HEADERS)
    assert status == 413 and reply["error"]["type"] == "request_too_large"
    said = reply["error"]["message"]
    assert f"({len(body):,} bytes): at most {most:,} bytes of JSON" in said
    assert "HTTP_FRONT_MAX_BODY_BYTES" in said

    async def chunked() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 65536):
            yield body[at : at + 65536]

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{front.base}/v1/messages", data=chunked(), headers=CLAUDE_HEADERS) as got,
    ):
        assert got.status == 413
        assert f"at most {most:,} bytes of JSON" in (await got.json())["error"]["message"]
    assert front.gateway.calls == 0


async def test_a_body_over_the_limit_of_many_values_is_refused_before_it_is_parsed(
    front: Front,
) -> None:
    """``{},`` by the tens of thousands: parsed, six times the limit of them built six times
    the objects of a body at the limit. Under the bound the body is parsed (a 400: ``{}`` is
    no message)."""
    head = b'{"model": "sim-large", "max_tokens": 5, "messages": ['
    tail = b'{"role": "user", "content": "hi"}]}'
    for pairs, status in ((LIMIT // 2 + 1, 413), (LIMIT // 2 - 8, 400)):
        body = head + b"{}," * pairs + tail
        values = body.count(b",") + body.count(b"{") + body.count(b"[")
        assert len(body) > LIMIT and (values > LIMIT) == (status == 413)
        got, reply = await _raw(front, "/v1/messages", body, CLAUDE_HEADERS)
        assert got == status, reply
        said = reply["error"]["message"]
        if status == 413:
            assert reply["error"]["type"] == "request_too_large"
            assert f"holds {values:,} values" in said and f"over {LIMIT:,}" in said
        else:
            assert said.startswith("messages.0")
    assert front.gateway.calls == 0


async def test_the_refusals_span_says_the_requests_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the router's span of a request over ROUTER_MAX_REQUEST_BYTES says it."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(app, "build_tracer_provider", lambda *_, **__: provider)
    body = json.dumps(_request("/v1/messages", _prose(LIMIT + 1000))).encode()
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_MAX_BODY_BYTES=str(LIMIT)) as served:
        front = Front(served.base, served.stop, served.metrics, FakeGateway())
        status, reply = await _raw(front, "/v1/messages", body, CLAUDE_HEADERS)
    assert status == 413
    served_spans: list[Any] = [s for s in spans.get_finished_spans() if s.name.startswith("POST")]
    (span,) = served_spans
    assert span.attributes["cachemesh.request_bytes"] == _measured(reply["error"]["message"])


async def test_a_plain_body_whose_text_is_over_the_limit_is_refused_before_it_is_parsed(
    front: Front, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its text, less what its escapes, whitespace and structure could save, over the limit:
    a body of 3 times the limit in plain ASCII was parsed and built into its request before
    its 413 (81 ms of the event loop for 12 MiB at the default limit)."""
    parsed: list[bytes] = []
    real = fields.parse_body

    def counted(raw: bytes, api: Api) -> dict[str, Any]:
        parsed.append(raw)
        return real(raw, api)

    monkeypatch.setattr("services.http_front.bodies.parse_body", counted)
    for path, headers in (("/v1/messages", CLAUDE_HEADERS), ("/v1/chat/completions", GPT_HEADERS)):
        body = json.dumps(_request(path, "a" * (3 * LIMIT))).encode()
        status, reply = await _raw(front, path, body, headers)
        assert status == 413, reply
        said = reply["error"]["message"] if "error" in reply else reply["message"]
        assert f"its JSON of {len(body):,} bytes holds at least" in said, said
        assert "HTTP_FRONT_MAX_BODY_BYTES" in said
    assert parsed == [] and front.gateway.calls == 0


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("ensure_ascii", [True, False])
async def test_prose_the_gateway_takes_is_never_refused_before_it_is_parsed(
    front: Front, indent: int | None, ensure_ascii: bool
) -> None:
    """Cyrillic and CJK prose just under the limit, escaped or not, pretty-printed or not."""
    path = "/v1/messages"
    request = _request(path, _fitting(path, LIMIT))
    body = json.dumps(request, indent=indent, ensure_ascii=ensure_ascii).encode()
    status, reply = await _raw(front, path, body, CLAUDE_HEADERS)
    assert status == 200, reply


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_many_short_messages_the_gateway_takes_are_never_refused_before_they_are_parsed(
    ensure_ascii: bool,
) -> None:
    """JSON's structure is most of such a body: each member is allowed for."""
    words = [w for w in _prose(4 * LIMIT).split(" ") if w]
    turns = [{"role": ("user", "assistant")[i % 2], "content": w} for i, w in enumerate(words)] + [
        {"role": "user", "content": "?"}
    ]
    while True:
        body = json.dumps(
            {"model": "sim-large", "max_tokens": 5, "messages": turns}, ensure_ascii=ensure_ascii
        ).encode()
        request, _ = anthropic_api.parse_request(json.loads(body))
        if request.ByteSize() <= LIMIT:
            break
        turns = turns[len(turns) // 10 :]
    assert len(body) > 2 * LIMIT  # checked
    bodies._least_request(body, LIMIT)  # no 413
