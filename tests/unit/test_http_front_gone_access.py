"""A caller that goes away before its request reaches the Gateway (its body half sent) has one
access line, the front's (``CANCELLED``, ``http_status`` 499, as the metric counts it): it had
none anywhere, though it held its tenant's in-flight slot and body budget. One that goes away
once the Gateway has its call has the router's line alone (the router logs it ``CANCELLED``)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.logs import JsonLines
from tests.unit.test_http_front_access_log import _access
from tests.unit.test_http_front_app import KEY, FakeGateway, serving
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

HEAD = (
    "POST {path} HTTP/1.1\r\nHost: front\r\nx-api-key: {key}\r\nauthorization: Bearer {key}\r\n"
    "anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
    "content-length: {length}\r\n\r\n"
)


async def _sent_then_gone(base: str, path: str, body: bytes, length: int) -> None:
    """Sends the head of a request of ``length`` bytes and ``body`` of it, then hangs up."""
    host, port = base.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    head = HEAD.format(path=path, key=KEY, length=length)
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
    hold = asyncio.Event()
    gateway = FakeGateway(hold=hold)
    async with serving(tmp_path, gateway, HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY="4") as front:
        await _sent_then_gone(front.base, "/v1/messages", b'{"model": "sim-l', 200)
        await _sent_then_gone(front.base, "/v1/chat/completions", b'{"messages', 300)
        gone = await _lines_until(capsys, 2)
        # one that the Gateway has: the router writes its line, the front none
        body = b'{"model": "sim-large", "max_tokens": 9, "stream": true, "messages": []}'
        task = asyncio.ensure_future(_sent_then_gone(front.base, "/v1/messages", body, len(body)))
        await asyncio.wait_for(gateway.arrived.wait(), 10)
        await task
        await asyncio.sleep(0.5)
        later = await _lines_until(capsys, 1, deadline_s=0.5)
        hold.set()
    assert [(x["method"], x["status"], x["http_status"], x["tenant"]) for x in gone] == [
        ("POST /v1/messages", "CANCELLED", 499, "tenant-a"),
        ("POST /v1/chat/completions", "CANCELLED", 499, "tenant-a"),
    ]
    for line in gone:
        assert line["refused_by"] == "http-front" and line["duration_ms"] >= 150
        assert len(line["request_id"]) == 32 and line["requested_model"] == "?"
    assert later == []
    assert gateway.calls == 1
