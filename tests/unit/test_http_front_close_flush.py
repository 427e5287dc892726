"""A connection the front closes while answers it wrote are still unsent (its caller reads
nothing) is closed for good within HTTP_FRONT_WRITE_TIMEOUT_S. asyncio closes a socket only
once what it buffered has gone out, with no bound: after aiohttp's own 400 to a request its
parser refuses (it closes the connection after), or an idle connection's close, a caller that
had pipelined requests and never read held that connection, counted in
HTTP_FRONT_MAX_CONNECTIONS, for ever (the front's own writes had each gone into the buffer in
time, so no write timeout saw it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.unit.test_http_front_app import FakeGateway, read_to_end, serving, small_window


async def _served_again(base: str, timeout_s: float) -> list[int]:
    """``GET /healthz`` until a 200 (or the timeout): the statuses seen."""
    seen: list[int] = []
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
        while not seen or seen[-1] != 200:
            async with session.get(f"{base}/healthz") as reply:
                seen.append(reply.status)
            await asyncio.sleep(0.05)
    return seen


@pytest.mark.parametrize(
    ("last", "idle_s"),
    [
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", "15"),  # aiohttp's own 400, then its close
        (b"", "0.5"),  # no more requests: the idle connection's close
    ],
    ids=["parser_400", "idle_close"],
)
async def test_a_close_with_unread_answers_is_bounded_by_the_write_timeout(
    tmp_path: Path, small_send_buffers: None, last: bytes, idle_s: str
) -> None:
    async with serving(
        tmp_path,
        FakeGateway(),
        HTTP_FRONT_WRITE_TIMEOUT_S="0.2",
        HTTP_FRONT_MAX_CONNECTIONS="1",
        HTTP_FRONT_IDLE_TIMEOUT_S=idle_s,
    ) as served:
        sock, host = await small_window(served.base)
        loop = asyncio.get_running_loop()
        # ~27 KB of answers: more than the socket buffers hold, far less than the 64 KiB
        # asyncio buffers before a write waits (no write of the front's times out)
        many = f"GET /healthz HTTP/1.1\r\nhost: {host}\r\n\r\n".encode() * 200
        try:
            await loop.sock_sendall(sock, many + last)
            # the one connection the front takes is held, so every other caller gets 503,
            # until that connection is closed for good: for ever before the fix
            seen = await _served_again(served.base, 30)
            assert seen[-1] == 200
            # the held connection ends: what the buffers held, then a reset (the rest dropped)
            await read_to_end(sock)
        finally:
            sock.close()


async def test_a_close_whose_answers_are_read_in_time_ends_without_an_error(
    tmp_path: Path, small_send_buffers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The bounded close when the caller does read (a drain's ``Connection: close``, the
    parser's 400, the idle close): its bytes go out, the connection closes as it should, and
    the bound, passed, does nothing. Before: its timed abort of the closed transport raised in
    asyncio's callback (an ERROR traceback, 3 of 3)."""
    async with serving(
        tmp_path, FakeGateway(), HTTP_FRONT_WRITE_TIMEOUT_S="0.5", HTTP_FRONT_IDLE_TIMEOUT_S="15"
    ) as served:
        sock, host = await small_window(served.base)
        loop = asyncio.get_running_loop()
        request = f"GET /healthz HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
        closing = f"GET /healthz HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode()
        try:
            await loop.sock_sendall(sock, request * 199 + closing)
            await asyncio.sleep(0.1)  # the answers wait in the front's buffer, then are read
            received = 0
            async with asyncio.timeout(30):
                while chunk := await loop.sock_recv(sock, 1 << 16):
                    received += len(chunk)
        finally:
            sock.close()
        assert received > 200 * len(b"HTTP/1.1 200 OK\r\n")  # every answer came
        await asyncio.sleep(1.0)  # past the bound
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [], [r.getMessage() for r in errors]
