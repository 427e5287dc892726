"""A caller that goes away before its request reaches the Gateway (its body half sent) has one
access line, the front's (``CANCELLED``, ``http_status`` 499, as the metric counts it): it had
none anywhere, though it held its tenant's in-flight slot and body budget. One that goes away
once the Gateway showed it has its call (a stream's first message came) has the router's line
alone (the router logs it ``CANCELLED``)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.common.logs import JsonLines
from services.tools.stack.ports import free_port
from tests.unit.test_http_front_access_log import _access
from tests.unit.test_http_front_app import KEY, FakeGateway, serving
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

HI_MESSAGES = [{"role": "user", "content": "hi"}]
HEAD = (
    "POST {path} HTTP/1.1\r\nHost: front\r\nx-api-key: {key}\r\nauthorization: Bearer {key}\r\n"
    "anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
    "content-length: {length}\r\n\r\n"
)


async def _sent_then_gone(
    base: str, path: str, body: bytes, length: int, idempotency_key: str = ""
) -> None:
    """Sends the head of a request of ``length`` bytes and ``body`` of it, then hangs up."""
    host, port = base.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    head = HEAD.format(path=path, key=KEY, length=length)
    if idempotency_key:
        head = head.replace("\r\n\r\n", f"\r\nidempotency-key: {idempotency_key}\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(0.2)  # the front has the head: it admitted the caller, reads its body
    writer.close()
    await writer.wait_closed()


async def _lines_until(
    capsys: pytest.CaptureFixture[str], count: int, deadline_s: float = 10.0
) -> list[dict[str, Any]]:
    """The access lines written so far, once there are ``count`` (or the deadline passed)."""
    err = ""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        err += capsys.readouterr().err
        if len(_access(err)) >= count:
            break
        await asyncio.sleep(0.05)
    return _access(err)


async def test_a_caller_gone_before_the_gateway_call_has_one_access_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    # a stream's start, then silence: the Gateway showed it has the call
    gateway = FakeGateway(pause_s=60.0)
    async with serving(tmp_path, gateway, HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY="4") as front:
        await _sent_then_gone(front.base, "/v1/messages", b'{"model": "sim-l', 200)
        await _sent_then_gone(front.base, "/v1/chat/completions", b'{"messages', 300)
        gone = await _lines_until(capsys, 2)
        # one whose call the Gateway showed it has (its start came): the router writes its
        # line, the front none
        body = b'{"model": "sim-large", "max_tokens": 9, "stream": true, "messages": []}'
        await _sent_then_gone(front.base, "/v1/messages", body, len(body))
        await asyncio.wait_for(gateway.cancelled.wait(), 10)  # the front cancelled the call
        await asyncio.sleep(0.5)
        later = await _lines_until(capsys, 1, deadline_s=0.5)
    assert [(x["method"], x["status"], x["http_status"], x["tenant"]) for x in gone] == [
        ("POST /v1/messages", "CANCELLED", 499, "tenant-a"),
        ("POST /v1/chat/completions", "CANCELLED", 499, "tenant-a"),
    ]
    for line in gone:
        assert line["refused_by"] == "http-front" and line["duration_ms"] >= 150
        assert len(line["request_id"]) == 32 and line["requested_model"] == "?"
        assert "gateway_replied" not in line  # no Gateway call began
    assert later == []
    assert gateway.calls == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_a_caller_gone_before_the_gateway_has_its_call_has_the_fronts_line(
    stream: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    """The front had begun the Gateway call, but the caller hung up before the Gateway sent
    anything (the router sends nothing before its answer or first message): the cancel may
    have beaten the call and no router ran it, so it had no line anywhere (a review's run: 26
    of 60 callers gone 0-2 ms after their body). The front writes its line; a router that had
    the call writes its own too."""
    hold = asyncio.Event()
    gateway = FakeGateway(hold=hold)
    async with serving(tmp_path, gateway, HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY="4") as front:
        body = b'{"model": "sim-large", "max_tokens": 9, "stream": %s, "messages": []}' % (
            b"true" if stream else b"false"
        )
        await _sent_then_gone(front.base, "/v1/messages", body, len(body), "gone-early-1")
        lines = await _lines_until(capsys, 1)
        hold.set()
    assert gateway.calls == 1
    assert [(x["request_id"], x["status"], x["http_status"], x["tenant"]) for x in lines] == [
        ("gone-early-1", "CANCELLED", 499, "tenant-a")
    ]
    assert lines[0]["refused_by"] == "http-front" and lines[0]["gateway_replied"] is False
    assert KEY not in capsys.readouterr().err + str(lines)


async def test_a_gateway_never_reached_has_the_fronts_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    """A 529 (Anthropic's overloaded; OpenAI's 503) for a Gateway the front could not reach:
    no router saw it, and it had no line anywhere (only the metric counted it)."""
    nowhere = f"127.0.0.1:{free_port()}"
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_GATEWAY_ADDR=nowhere) as front:
        async with aiohttp.ClientSession() as session:
            sent = {"model": "sim-large", "max_tokens": 9, "messages": HI_MESSAGES}
            headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
            async with session.post(f"{front.base}/v1/messages", json=sent, headers=headers) as r:
                status, named = r.status, r.headers["x-cachemesh-request-id"]
        lines = await _lines_until(capsys, 1)
    assert status == 529
    assert [(x["request_id"], x["status"], x["http_status"]) for x in lines] == [
        (named, "UNAVAILABLE", 529)
    ]
    assert lines[0]["tenant"] == "tenant-a" and lines[0]["gateway_replied"] is False
    assert KEY not in str(lines)
