"""Requests aiohttp's HTTP parser refuses before the front sees them (a control byte in a header,
a line over the size limit, a broken request line): the 400 and the log line say why, and
repeat none of the request's bytes, so an API key in the broken line is in neither."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.unit.test_http_front_app import KEY, FakeGateway, serving

BODY = b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
LINE = b"POST /v1/messages HTTP/1.1\r\n"
TAIL = b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
K = KEY.encode()


async def _send(base: str, head: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"Host: x\r\nanthropic-version: 2023-06-01\r\nConnection: close\r\n" + TAIL)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    return reply


def _logged(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text


@pytest.mark.parametrize(
    "head",
    [
        LINE + b"x-api-key: " + K + b"\x00\r\n",  # a key pasted with a stray control byte
        LINE + b"Authorization: Bearer " + K + b"\x01\r\n",
        LINE + b"x-api-key: " + K + b"a" * 9000 + b"\r\n",  # a header line over the limit
        LINE + b"x-api-key\x01: " + K + b"\r\n",  # a broken header name
        LINE + b"x-api-key " + K + b"\r\n",  # no colon
        b"POST /v1/messages?key=" + K + b" HTTP/1.1\x00\r\n",  # a broken request line
        b"P\x00ST /v1/messages?key=" + K + b" HTTP/1.1\r\n",
        b"POST /v1/messages?key=" + K + b"a" * 9000 + b" HTTP/1.1\r\n",  # a line over the limit
    ],
)
async def test_a_request_the_parser_refuses_is_a_400_that_repeats_none_of_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(tmp_path, fake := FakeGateway()) as front:
        reply = await _send(front.base, head)
    status, _, rest = reply.partition(b"\r\n\r\n")
    assert status.split(b" ")[1] == b"400", reply[:200]
    assert K not in reply and b"Bad Request" in rest
    logged = [_logged(r) for r in caplog.records]
    assert not [line for line in logged if KEY in line], logged
    assert [line for line in logged if "the HTTP parser refused a request" in line], logged
    assert fake.calls == 0
