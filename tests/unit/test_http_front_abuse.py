"""Hostile clients against the front process (real aiohttp server, real gRPC to a fake
Gateway): headers never finished, too many headers, more connections than the cap, a body
dripped a byte at a time, floods of ``GET /readyz``; each ends in a bounded outcome. Deadlines
are made small and the tests assert outcomes, never how long something took."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.env import ConfigError
from services.http_front.app import serve
from services.http_front.connections import RESERVED_FILES, fit_open_files
from services.http_front.readiness import CachedVerdict
from tests.unit.test_http_front_app import KEY, FakeGateway, serving

BODY = b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
ANTHROPIC = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
OPENAI = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
OUTCOME_S = 10.0  # how long a test waits for an outcome at most (a hang fails it)


async def _connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """All the front sends until it closes the connection (a hang fails the test)."""
    return await asyncio.wait_for(reader.read(), OUTCOME_S)


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


async def _one_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), OUTCOME_S)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), OUTCOME_S)


@pytest.fixture
async def held() -> AsyncIterator[list[asyncio.StreamWriter]]:
    """Connections a test holds open: closed at its end."""
    writers: list[asyncio.StreamWriter] = []
    yield writers
    for writer in writers:
        writer.close()


# --- the header (idle) deadline, the header limits ---------------------------------------------
@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, nothing sent
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: ",  # headers never finished
    ],
)
async def test_a_connection_that_never_finishes_its_headers_is_closed_at_the_idle_deadline(
    tmp_path: Path, sent: bytes
) -> None:
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_IDLE_TIMEOUT_S="0.2") as front:
        reader, writer = await _connect(front.base)
        writer.write(sent)
        await writer.drain()
        try:
            assert await _until_closed(reader) == b""
        finally:
            writer.close()


async def test_an_idle_keep_alive_connection_is_closed_at_the_idle_deadline(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_IDLE_TIMEOUT_S="0.2") as front:
        reader, writer = await _connect(front.base)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert _status(await _one_response(reader)) == 200
        try:
            assert await _until_closed(reader) == b""
        finally:
            writer.close()


async def test_more_headers_than_the_limit_are_refused_naming_the_limit(tmp_path: Path) -> None:
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(60))
    async with serving(tmp_path, fake := FakeGateway()) as front:
        reader, writer = await _connect(front.base)
        writer.write(ANTHROPIC + many + b"x-api-key: " + KEY.encode() + b"\r\n\r\n")
        await writer.drain()
        reply = await _until_closed(reader)
        writer.close()
    assert _status(reply) == 400, reply[:300]
    assert b"more than 48 headers" in reply, reply
    assert fake.calls == 0


async def test_a_header_over_the_field_limit_is_refused(tmp_path: Path) -> None:
    async with serving(tmp_path, FakeGateway()) as front:
        reader, writer = await _connect(front.base)
        writer.write(ANTHROPIC + b"x-pad: " + b"v" * 5000 + b"\r\n\r\n")
        await writer.drain()
        reply = await _until_closed(reader)
        writer.close()
    assert _status(reply) == 400, reply[:300]
    assert b"longer than the limit" in reply


# --- the connection cap ------------------------------------------------------------------------
async def test_a_connection_over_the_cap_is_answered_503_and_closed(
    tmp_path: Path, held: list[asyncio.StreamWriter]
) -> None:
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_MAX_CONNECTIONS="2") as front:
        for _ in range(2):  # two kept-alive connections, each served once: both counted
            reader, writer = await _connect(front.base)
            held.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(await _one_response(reader)) == 200
        reader, writer = await _connect(front.base)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await _until_closed(reader)
        writer.close()
        assert _status(reply) == 503, reply
        assert b"HTTP_FRONT_MAX_CONNECTIONS" not in reply  # a setting's name is the log's
        assert b"retry-after" in reply.lower()
        held.pop().close()  # one of the two leaves: a new connection is served again
        for _ in range(100):
            reader, writer = await _connect(front.base)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            again = await _until_closed(reader)
            writer.close()
            if _status(again) == 200:
                break
            await asyncio.sleep(0.02)  # the server has not yet seen the close
        assert _status(again) == 200


@pytest.mark.parametrize(
    ("limits", "raised_to"),
    [((256, 1 << 20), 100 + RESERVED_FILES), ((1024, 1 << 20), None)],
)
def test_the_open_file_limit_is_raised_to_fit_the_cap(
    limits: tuple[int, int], raised_to: int | None
) -> None:
    set_to: list[tuple[int, int]] = []
    fit_open_files(100, get=lambda: limits, set_soft=set_to.append)
    assert set_to == ([] if raised_to is None else [(raised_to, limits[1])])


def test_a_cap_the_hard_open_file_limit_cannot_hold_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"HTTP_FRONT_MAX_CONNECTIONS \(4096\).*at most 1024"):
        fit_open_files(4096, chosen=True, get=lambda: (1024, 1024), set_soft=lambda _: None)


def test_the_default_cap_is_lowered_to_what_a_low_hard_limit_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HTTP_FRONT_MAX_CONNECTIONS unset on a host whose hard limit is 4,096 (some are): the
    front starts, holding the connections that limit leaves, and says so once."""
    set_to: list[tuple[int, int]] = []
    cap = fit_open_files(4096, chosen=False, get=lambda: (1024, 4096), set_soft=set_to.append)
    assert cap == 4096 - RESERVED_FILES
    assert set_to == [(4096, 4096)]
    assert any("HTTP_FRONT_MAX_CONNECTIONS" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError):  # too low to hold even the front's own files
        fit_open_files(4096, chosen=False, get=lambda: (64, 200), set_soft=set_to.append)


async def test_the_accept_error_of_a_full_file_table_is_logged_once_an_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio's accept loop logs "socket.accept() out of system resource" with a traceback
    for each try while the process has no file handle left: 696,401 of them in 20 s."""
    caplog.set_level(logging.INFO)
    async with serving(tmp_path, FakeGateway()):
        loop = asyncio.get_running_loop()
        for _ in range(500):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(24, "Too many open files"),
                }
            )
    lines = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert 1 <= len(lines) <= 2, len(lines)
    assert "HTTP_FRONT_MAX_CONNECTIONS" in lines[0].getMessage()


# --- the body: its deadline, the tenant's slot taken before it ---------------------------------
@pytest.mark.parametrize(("line", "shape"), [(ANTHROPIC, "anthropic"), (OPENAI, "openai")])
async def test_a_body_not_sent_within_its_deadline_is_a_408_in_the_apis_shape(
    tmp_path: Path, line: bytes, shape: str
) -> None:
    async with serving(tmp_path, fake := FakeGateway(), HTTP_FRONT_BODY_TIMEOUT_S="0.2") as front:
        reader, writer = await _connect(front.base)
        head = line + b"x-api-key: " + KEY.encode() + b"\r\nauthorization: Bearer "
        head += KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
        writer.write(head + BODY[:20])  # the rest never comes
        await writer.drain()
        reply = await _until_closed(reader)  # answered, and the connection closed
        writer.close()
    assert _status(reply) == 408, reply[:300]
    error = json.loads(reply.partition(b"\r\n\r\n")[2])
    if shape == "anthropic":
        assert error["type"] == "error" and "HTTP_FRONT_BODY_TIMEOUT_S" not in str(error)
        assert "0.2 s" in error["error"]["message"]
    else:
        assert error["error"]["code"] == "request_timeout"
        assert "0.2 s" in error["error"]["message"]
    assert fake.calls == 0


async def test_an_upload_in_progress_holds_its_tenants_slot(
    tmp_path: Path, held: list[asyncio.StreamWriter]
) -> None:
    """HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY is 1: a body still coming counts, so the tenant's next
    request is a 429 (a tenant's slow uploads were unbounded, each holding its buffer)."""
    async with serving(tmp_path, fake := FakeGateway()) as front:
        _, writer = await _connect(front.base)
        held.append(writer)
        head = ANTHROPIC + b"x-api-key: " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
        writer.write(head + BODY[:20])
        await writer.drain()
        statuses = []
        for _ in range(50):  # until the front has read the upload's head (one try, usually)
            reader, other = await _connect(front.base)
            other.write(
                ANTHROPIC
                + b"x-api-key: "
                + KEY.encode()
                + b"\r\nConnection: close\r\nContent-Length: "
                + str(len(BODY)).encode()
                + b"\r\n\r\n"
                + BODY
            )
            reply = await _until_closed(reader)
            other.close()
            statuses.append(_status(reply))
            if statuses[-1] == 429:
                break
            await asyncio.sleep(0.02)
        assert statuses[-1] == 429, statuses
        assert fake.calls == statuses.count(200)


# --- readiness ---------------------------------------------------------------------------------
async def test_readyz_names_no_internal_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(tmp_path, FakeGateway()) as front:
        reader, writer = await _connect(front.base)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = await _until_closed(reader)
        writer.close()
    assert _status(reply) == 503
    assert b"127.0.0.1" not in reply, reply
    assert any("127.0.0.1" in r.getMessage() and "not serving" in r.getMessage()
               for r in caplog.records)  # fmt: skip


async def test_the_readiness_verdict_is_asked_once_a_second_and_shared() -> None:
    """A flood of GET /readyz was one health call to the router each."""
    now = [100.0]
    calls = []
    release = asyncio.Event()

    async def check() -> bool:
        calls.append(now[0])
        await release.wait()
        return True

    verdict = CachedVerdict(check, lambda: now[0], "10.0.0.7:50051", ttl_s=1.0)
    readers = [asyncio.ensure_future(verdict.serving()) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    assert all(await asyncio.gather(*readers))
    assert len(calls) == 1  # the 50 at once shared one call
    now[0] += 0.9
    assert await verdict.serving() and len(calls) == 1  # still fresh
    now[0] += 0.2
    assert await verdict.serving() and len(calls) == 2  # a second on: asked again


async def test_a_reader_that_goes_away_does_not_cancel_the_shared_check() -> None:
    release = asyncio.Event()

    async def check() -> bool:
        await release.wait()
        return False

    verdict = CachedVerdict(check, lambda: 0.0, "10.0.0.7:50051")
    gone = asyncio.ensure_future(verdict.serving())
    stays = asyncio.ensure_future(verdict.serving())
    await asyncio.sleep(0)
    gone.cancel()
    release.set()
    assert await stays is False


# --- what the front says about itself ----------------------------------------------------------
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nx-bad: a\x01b\r\n\r\n",  # the parser's 400
    ],
)
async def test_no_response_names_the_servers_software(tmp_path: Path, request_bytes: bytes) -> None:
    async with serving(tmp_path, FakeGateway()) as front:
        reader, writer = await _connect(front.base)
        writer.write(request_bytes)
        reply = await _until_closed(reader)
        writer.close()
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert b"aiohttp" not in head and b"python" not in head, head


# --- the settings ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HTTP_FRONT_IDLE_TIMEOUT_S", "0"),
        ("HTTP_FRONT_IDLE_TIMEOUT_S", "soon"),
        ("HTTP_FRONT_BODY_TIMEOUT_S", "0"),
        ("HTTP_FRONT_BODY_TIMEOUT_S", "nan"),
        ("HTTP_FRONT_MAX_CONNECTIONS", "0"),
        ("HTTP_FRONT_MAX_CONNECTIONS", "many"),
        ("HTTP_FRONT_MAX_CONNECTIONS", "100000000"),  # above any open-file limit
    ],
)
async def test_a_bad_setting_stops_the_start_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    env = {
        "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1",
        "CACHEMESH_API_KEYS_FILE": str(tmp_path / "keys"),
        "OTEL_TRACES_EXPORTER": "none",
        name: value,
    }
    with pytest.raises(ConfigError, match=name):
        await serve(env, asyncio.Event())


async def test_the_gateways_verdict_is_logged_when_it_changes_not_when_first_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Gateway not serving is said, with its address; its first serving verdict is not (asked
    by a health probe at any time, perhaps beside a request, where every line must carry a trace
    id); once it has served, its going away is said, and so is its coming back."""
    caplog.set_level(logging.INFO, logger="cachemesh.http_front")
    now = [0.0]
    answers = [False, True, False, True]

    async def check() -> bool:
        return answers.pop(0)

    verdict = CachedVerdict(check, lambda: now[0], "127.0.0.1:50051", ttl_s=1.0)
    said: list[str] = []
    for _ in range(4):
        await verdict.serving()
        said.append(" | ".join(r.getMessage() for r in caplog.records))
        caplog.clear()
        now[0] += 2.0
    assert "not serving" in said[0] and said[1] == ""
    assert "not serving" in said[2] and "127.0.0.1:50051" in said[2]
    assert said[3].endswith("is serving")
