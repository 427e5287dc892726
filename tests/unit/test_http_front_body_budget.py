"""The bytes of request bodies the front holds while it reads them, all requests together
(``HTTP_FRONT_BODY_BUDGET_BYTES``, ``limits.BodyBudget``). The front reads a body's JSON up to 6
times ``HTTP_FRONT_MAX_BODY_BYTES`` (12 MiB), and a body still coming held what it had sent
until ``HTTP_FRONT_BODY_TIMEOUT_S``: 80 uploads of 11 MiB (two tenants' in-flight slots) held
a front process at 976 MB, measured; under the budget's default, 205 MB (10 read, 70
refused). A body takes its bytes as they arrive (one tenant's bodies a quarter of the budget
at most); one finding no room gets the front's overload, 529 / 503 with ``retry-after``,
which both SDKs retry."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from services.common.env import ConfigError
from services.common.logs import JsonLines
from services.common.metrics import LoopCounter
from services.http_front.limits import BodyBudget, BodyFull
from services.http_front.settings import HttpFrontSettings
from tests.unit.test_http_front_app import KEY, FakeGateway, Served, serving
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

# ``serving``'s HTTP_FRONT_MAX_BODY_BYTES is 4096: a body's JSON may be 6 times it
MOST_JSON = 6 * 4096
BODY = b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
# a valid request as long as a body may be (JSON's whitespace: its request stays small)
LONGEST = BODY[:-1] + b" " * (MOST_JSON - len(BODY)) + b"}"
OUTCOME_S = 10.0  # how long a test waits for an outcome at most (a hang fails it)


# --- the budget itself -------------------------------------------------------------------------
async def test_a_body_takes_its_bytes_as_they_arrive_and_gives_them_back() -> None:
    """A declared length is only checked against the room there is (``fits``): nothing is
    taken before a byte comes, so an upload whose bytes never come holds nothing."""
    gauge = LoopCounter()
    budget = BodyBudget(100, 100, gauge)
    with budget.reading("a") as first:
        assert first.fits(100) and budget.used == 0
        first.cover(30)
        first.cover(70)
        assert (first.taken, budget.used, gauge.value) == (70, 70, 70)
        with budget.reading("b") as second:
            assert not second.fits(31) and second.fits(30)
            with pytest.raises(BodyFull):
                second.cover(31)
            second.cover(30)
            assert budget.used == 100
        assert budget.used == 70
    assert (budget.used, gauge.value, budget.used_by("a")) == (0, 0, 0)


async def test_one_tenants_bodies_hold_at_most_its_share_and_others_still_have_room() -> None:
    """Its share: the whole budget once was (11 idle uploads of one tenant held it all, and
    every other request got 529 for ``HTTP_FRONT_BODY_TIMEOUT_S``)."""
    budget = BodyBudget(100, 25)
    assert budget.tenant_limit == 25
    with budget.reading("a") as one, budget.reading("a") as two:
        one.cover(20)
        assert not two.fits(6) and two.fits(5)
        with pytest.raises(BodyFull):
            two.cover(6)
        assert (budget.used_by("a"), budget.room("a"), budget.room("b")) == (20, 5, 25)
        with budget.reading("b") as other:
            other.cover(25)
        assert budget.used == 20
    assert budget.used == 0


def test_a_tenants_share_is_a_quarter_or_the_longest_body() -> None:
    settings = HttpFrontSettings.from_env(ENV)
    assert settings.body_tenant_bytes == settings.body_budget_bytes // 4 == 32 << 20
    least = HttpFrontSettings.from_env({**ENV, "HTTP_FRONT_BODY_BUDGET_BYTES": str(12 << 20)})
    assert least.body_tenant_bytes == least.max_json_bytes == 12 << 20


# --- through the front -------------------------------------------------------------------------
async def _connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _hold_upload(
    front: Served, sent: int = MOST_JSON - 1, reading: int | None = None
) -> asyncio.StreamWriter:
    """An upload declaring the longest body the front reads, its first ``sent`` bytes sent, the
    rest not (a slow client): it holds them once the front has read them (all of the budget
    but a byte, unless told), until the front's bodies hold ``reading`` (``sent``)."""
    _, writer = await _connect(front.base)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"x-api-key: " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(LONGEST)
    )
    writer.write(LONGEST[:sent])
    await writer.drain()
    async with aiohttp.ClientSession() as session:
        for _ in range(500):  # until the front has taken the budget for it (one try, usually)
            async with session.get(front.metrics) as reply:
                if f"cachemesh_http_front_body_bytes_reading {float(reading or sent)}" in (
                    await reply.text()
                ):
                    return writer
            await asyncio.sleep(0.01)
    raise AssertionError("the front never took the upload's bytes")


async def _metric(front: Served, name: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(front.metrics) as reply:
        text = await reply.text()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


# the budget exactly the longest body: one upload holds it all; several of the tenant's at once
BUDGET_ENV = {
    "HTTP_FRONT_BODY_BUDGET_BYTES": str(MOST_JSON),
    "HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY": "8",
}


@pytest.fixture
async def budget_front(tmp_path: Path) -> AsyncIterator[tuple[Served, FakeGateway]]:
    gateway = FakeGateway()
    async with serving(tmp_path, gateway, **BUDGET_ENV) as front:
        yield front, gateway


async def test_a_body_with_no_room_is_refused_529_in_anthropics_shape_and_counted(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    async with serving(tmp_path, gateway := FakeGateway(), **BUDGET_ENV) as front:
        held = await _hold_upload(front)
        claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY, max_retries=0)
        try:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await claude.messages.create(
                    model="sim-large", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                )
        finally:
            await claude.close()
            held.close()
        counted = await _metric(front, "cachemesh_http_front_body_budget_refusals_total")
    error = refused.value
    assert error.status_code == 529
    assert error.response.headers["retry-after"] == "1"  # both SDKs wait that, then retry
    assert "x-should-retry" not in error.response.headers
    body: Any = error.body
    assert (body["type"], body["error"]["type"]) == ("error", "overloaded_error")
    assert "HTTP_FRONT_BODY_BUDGET_BYTES" in body["error"]["message"]
    assert f"{MOST_JSON:,} bytes of bodies at once" in body["error"]["message"]
    assert f"at most {MOST_JSON:,} of them one tenant's" in body["error"]["message"]
    assert gateway.calls == 0
    assert counted == 'cachemesh_http_front_body_budget_refusals_total{api="anthropic"} 1.0'
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "cachemesh.access"]
    assert [(x["status"], x["http_status"], x["tenant"]) for x in access] == [
        ("UNAVAILABLE", 529, "tenant-a")
    ]


async def test_a_body_with_no_room_is_refused_503_in_openais_shape(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    front, gateway = budget_front
    held = await _hold_upload(front)
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            await gpt.chat.completions.create(
                model="sim-large", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await gpt.close()
        held.close()
    error = refused.value
    assert error.status_code == 503
    assert error.response.headers["retry-after"] == "1"
    body: Any = error.body
    assert (body["type"], body["code"]) == ("server_error", "overloaded")
    assert "HTTP_FRONT_BODY_BUDGET_BYTES" in body["message"]
    assert gateway.calls == 0


async def test_the_sdks_retry_lands_once_the_budget_has_room(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    """The refusal is one the SDKs retry by default: the slow upload gone, the retry (after
    ``retry-after``) is read and answered."""
    front, gateway = budget_front
    held = await _hold_upload(front)
    claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY, max_retries=2)
    try:
        asked = asyncio.ensure_future(
            claude.messages.create(
                model="sim-large", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        )
        for _ in range(500):  # until its first try was refused
            if await _metric(front, "cachemesh_http_front_body_budget_refusals_total"):
                break
            await asyncio.sleep(0.01)
        held.close()  # the slow client gives up: its bytes are given back
        answer = await asyncio.wait_for(asked, OUTCOME_S)
    finally:
        await claude.close()
    assert answer.content and gateway.calls == 1


async def test_a_chunked_body_past_the_budget_is_refused_at_once(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    front, gateway = budget_front
    held = await _hold_upload(front)
    reader, writer = await _connect(front.base)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nauthorization: Bearer "
        + KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked
    )
    try:
        reply = await asyncio.wait_for(reader.read(), OUTCOME_S)
    finally:
        writer.close()
        held.close()
    assert reply.split(b" ", 2)[1] == b"503", reply[:300]
    assert b"HTTP_FRONT_BODY_BUDGET_BYTES" in reply
    assert gateway.calls == 0


async def test_idle_uploads_declaring_the_longest_body_hold_nothing_and_others_are_served(
    tmp_path: Path,
) -> None:
    """11 uploads declaring the longest body, their bytes not sent: they took the whole
    budget before a byte came, and every other request got 529 (at t+0, +5, +10 s; 0 Gateway
    calls) until ``HTTP_FRONT_BODY_TIMEOUT_S``. Now they hold the byte each sent."""
    env = {"HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY": "64", "HTTP_FRONT_BODY_TIMEOUT_S": "30"}
    async with serving(tmp_path, gateway := FakeGateway(), **env) as front:
        held = [await _hold_upload(front, sent=1, reading=n) for n in range(1, 12)]
        claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY, max_retries=0)
        try:
            answer = await claude.messages.create(
                model="sim-large", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await claude.close()
            for writer in held:
                writer.close()
    assert answer.content and gateway.calls == 1


async def test_a_chunked_body_with_room_is_read_while_a_declared_one_finds_none(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    """A declared body over the room there is is refused at once; it waited its turn (1 s),
    and while it waited every chunked body was refused, even one with room."""
    front, gateway = budget_front
    held = await _hold_upload(front, sent=MOST_JSON // 2)
    _, waiting = await _connect(front.base)
    waiting.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"x-api-key: " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(LONGEST)
    )
    await waiting.drain()
    await asyncio.sleep(0.1)  # its head read
    reader, writer = await _connect(front.base)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nauthorization: Bearer "
        + KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked
    )
    try:
        reply = await asyncio.wait_for(reader.read(), OUTCOME_S)
    finally:
        writer.close()
        waiting.close()
        held.close()
    assert reply.split(b" ", 2)[1] == b"200", reply[:300]
    assert gateway.calls == 1


async def test_bodies_within_the_budget_are_all_read_and_its_bytes_given_back(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    front, gateway = budget_front
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # each the whole budget, one after the other
            headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
            url = f"{front.base}/v1/messages"
            async with session.post(url, data=LONGEST, headers=headers) as reply:
                assert reply.status == 200, await reply.text()
    assert gateway.calls == 3
    reading = await _metric(front, "cachemesh_http_front_body_bytes_reading")
    assert reading == "cachemesh_http_front_body_bytes_reading 0.0"


# --- the setting -------------------------------------------------------------------------------
ENV = {
    "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1",
    "CACHEMESH_API_KEYS_FILE": "/nonexistent/keys",
}


def test_the_budget_defaults_to_64_requests_at_the_body_limit() -> None:
    settings = HttpFrontSettings.from_env(ENV)
    assert settings.body_budget_bytes == 64 * settings.max_body_bytes == 128 << 20
    lowered = HttpFrontSettings.from_env({**ENV, "HTTP_FRONT_MAX_BODY_BYTES": "65536"})
    assert lowered.body_budget_bytes == 64 * 65536
    set_ = HttpFrontSettings.from_env({**ENV, "HTTP_FRONT_BODY_BUDGET_BYTES": "300000000"})
    assert set_.body_budget_bytes == 300_000_000


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (str((12 << 20) - 1), "must be at least 12582912"),  # under 6 x 2 MiB: the longest body
        ("lots", "HTTP_FRONT_BODY_BUDGET_BYTES"),
        ("-1", "HTTP_FRONT_BODY_BUDGET_BYTES"),
    ],
)
def test_a_budget_that_could_not_read_the_longest_body_stops_the_start(
    value: str, said: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        HttpFrontSettings.from_env({**ENV, "HTTP_FRONT_BODY_BUDGET_BYTES": value})
