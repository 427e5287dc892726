"""A request the HTTP front refuses itself, before the Gateway sees it (401 no or unknown key,
429 the front's own in-flight cap, 413 too large a body, 400 a body it cannot read), has one
access line, in the router's format (``cachemesh.access``; tenant, request_id, method,
requested_model, status as a gRPC code, duration_ms), never the key. A request the Gateway
took has none from the front: the router writes its line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.common.errors import Code
from services.common.logs import JsonLines
from services.http_front.access_log import RefusalLog
from tests.unit.test_http_front_app import CLAUDE_HEADERS, GPT_HEADERS, HI, FakeGateway, serving
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

WRONG_KEY = "cm_wrong-key-0123456789abcdefghij"  # a key no tenant has
# the fields of the router's line of a request it refused (``RequestLog.refused``)
ROUTER_REFUSED = {"tenant", "request_id", "method", "requested_model", "status", "duration_ms"}
ASK = b'{"model": "sim-large", "max_tokens": 50, "messages": ' + HI


def _access(err: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in found if line["logger"] == "cachemesh.access"]


async def test_each_refusal_of_the_front_has_one_access_line_without_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    hold = asyncio.Event()
    gateway = FakeGateway(hold=hold)
    sent: list[tuple[str, int, str]] = []  # what each refused caller received: its request id
    async with serving(tmp_path, gateway) as front, aiohttp.ClientSession() as session:
        url = f"{front.base}/v1/messages"

        async def post(body: bytes, headers: dict[str, str], path: str = url) -> None:
            async with session.post(path, data=body, headers=headers) as reply:
                await reply.read()
                sent.append(("", reply.status, reply.headers.get("x-cachemesh-request-id", "")))

        await post(ASK, {**CLAUDE_HEADERS, "x-api-key": WRONG_KEY})  # 401 unknown key
        await post(ASK, {"anthropic-version": "2023-06-01"})  # 401 no key
        too_long = b'[{"role": "user", "content": "' + b"m" * 5000 + b'"}]}'
        await post(ASK[: -len(HI)] + too_long, CLAUDE_HEADERS)  # 413 over 4096 bytes
        await post(b'{"model": "sim-large", "max', CLAUDE_HEADERS)  # 400 not JSON
        chat = f"{front.base}/v1/chat/completions"
        await post(b'{"model": "sim-large", "messages": 7}', GPT_HEADERS, chat)  # 400 its shape
        held = asyncio.ensure_future(session.post(url, data=ASK, headers=CLAUDE_HEADERS))
        await asyncio.wait_for(gateway.arrived.wait(), 10)
        await post(ASK, CLAUDE_HEADERS)  # 429: the tenant's one request in flight is held
        hold.set()
        async with await held as reply:  # the Gateway's answer: the router's line, not ours
            assert reply.status == 200
            await reply.read()
        gateway.refuse = (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: too many", ())
        await post(ASK, CLAUDE_HEADERS)  # 400 of the Gateway: the router's line too
    err = capsys.readouterr().err
    assert [status for _, status, _ in sent] == [401, 401, 413, 400, 400, 429, 400]
    lines = _access(err)
    assert [(x["status"], x["http_status"], x["tenant"]) for x in lines] == [
        ("UNAUTHENTICATED", 401, ""),
        ("UNAUTHENTICATED", 401, ""),
        ("RESOURCE_EXHAUSTED", 413, "tenant-a"),
        ("INVALID_ARGUMENT", 400, "tenant-a"),
        ("INVALID_ARGUMENT", 400, "tenant-a"),
        ("RESOURCE_EXHAUSTED", 429, "tenant-a"),
    ]
    for line, (_, _, request_id) in zip(lines, sent, strict=False):
        assert set(line) >= ROUTER_REFUSED, line  # the router's fields, and its head
        assert (line["level"], line["msg"], line["refused_by"]) == ("INFO", "access", "http-front")
        assert line["request_id"] == request_id and len(request_id) == 32  # what the caller got
        assert line["requested_model"] == "?"
        assert line["duration_ms"] >= 0
        assert len(line["trace_id"]) == 32  # joined to the refusal's span
    methods = [x["method"] for x in lines]
    assert methods == ["POST /v1/messages"] * 4 + ["POST /v1/chat/completions"] + [
        "POST /v1/messages"
    ]
    for part in (WRONG_KEY, WRONG_KEY[:12], WRONG_KEY[-10:], "cm_test-key"):
        assert part not in err  # no key, whole or in part, in any line


def test_the_refusal_line_in_text_format_has_the_same_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="cachemesh.access"):
        RefusalLog().refused("", "r" * 32, "POST /v1/messages", Code.UNAUTHENTICATED, 401, 0.0042)
        RefusalLog().refused("t", "r2", "POST /v1/messages", Code.DEADLINE_EXCEEDED, 408, 1.0)
    first, second = (r.__dict__["fields"] for r in caplog.records)
    assert first == {
        "tenant": "",
        "request_id": "r" * 32,
        "method": "POST /v1/messages",
        "requested_model": "?",
        "status": "UNAUTHENTICATED",
        "duration_ms": 4.2,
        "http_status": 401,
        "refused_by": "http-front",
    }
    assert second["deadline"] == "client"  # the caller's body came too slowly


def test_the_refusal_line_is_off_above_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cachemesh.access"):
        RefusalLog().refused("", "r", "POST /v1/messages", Code.UNAUTHENTICATED, 401, 0.1)
    assert not caplog.records
