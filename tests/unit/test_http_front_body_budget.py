"""The bytes of request bodies the front holds while it reads them, all requests together
(``HTTP_FRONT_BODY_BUDGET_BYTES``, ``limits.BodyBudget``). The front reads a body's JSON up to 6
times ``HTTP_FRONT_MAX_BODY_BYTES`` (12 MiB), and a body still coming held what it had sent
until ``HTTP_FRONT_BODY_TIMEOUT_S``: 80 uploads of 11 MiB (two tenants' in-flight slots) held
a front process at 976 MB, measured; under the budget's first default, 205 MB (10 read, 70
refused; before the tenant's share). A body takes its bytes as they arrive (one tenant's
bodies a quarter of the budget at most, a declared length reserved of that quarter before it
is read); one finding no room gets the front's overload, 529 / 503 with ``retry-after``,
which both SDKs retry."""

from __future__ import annotations

import asyncio
import contextlib
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

from services.common.auth import hash_key
from services.common.env import ConfigError
from services.common.logs import JsonLines
from services.common.metrics import LoopCounter
from services.http_front.limits import BodyBudget, BodyFull, Reading
from services.http_front.settings import HttpFrontSettings
from tests.unit.test_http_front_app import KEY, FakeGateway, Served, serving
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

# ``serving``'s HTTP_FRONT_MAX_BODY_BYTES is 4096: a body's JSON may be 6 times it
MOST_JSON = 6 * 4096
BODY = b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
# a valid request as long as a body may be (JSON's whitespace: its request stays small)
LONGEST = BODY[:-1] + b" " * (MOST_JSON - len(BODY)) + b"}"
OUTCOME_S = 10.0  # how long a test waits for an outcome at most (a hang fails it)
OTHER = "cm_test-key-of-tenant-b"  # another tenant's key (``_keys``)


# --- the budget itself -------------------------------------------------------------------------
async def test_a_body_takes_its_bytes_as_they_arrive_and_gives_them_back() -> None:
    """A declared length is held of its tenant's share only: nothing is taken front-wide
    before a byte comes, so an upload whose bytes never come holds none of it."""
    gauge = LoopCounter()
    budget = BodyBudget(100, 100, gauge)
    with budget.reading("a") as first:
        first.reserve(100)
        assert (budget.used, budget.used_by("a"), budget.room("b")) == (0, 100, 100)
        first.cover(30)
        first.cover(70)
        assert (first.taken, budget.used, gauge.value, budget.used_by("a")) == (70, 70, 70, 100)
        with budget.reading("b") as second:
            second.reserve(30)
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
        one.reserve(20)
        with pytest.raises(BodyFull):
            two.reserve(6)
        assert two.held == 0  # refused whole: nothing kept
        two.reserve(5)
        assert (budget.used_by("a"), budget.room("a"), budget.room("b"), budget.used) == (
            25,
            0,
            25,
            0,
        )
        with budget.reading("b") as other:
            other.cover(25)
        one.cover(20)
        assert budget.used == 20
    assert (budget.used, budget.used_by("a")) == (0, 0)


def test_a_chunked_body_takes_its_share_as_it_arrives_and_one_past_its_length_too() -> None:
    """No declared length (chunked): bytes take the front-wide budget and the share together;
    a body that grows past its declared length (decompressed) takes the share beyond it."""
    budget = BodyBudget(100, 25)
    with budget.reading("a") as chunked, budget.reading("a") as declared:
        chunked.cover(10)
        assert (budget.used, budget.used_by("a")) == (10, 10)
        declared.reserve(10)
        declared.cover(12)
        assert (budget.used, budget.used_by("a"), declared.held) == (22, 22, 12)
        with pytest.raises(BodyFull):
            chunked.cover(14)
        assert (budget.used, budget.used_by("a")) == (22, 22)
    assert (budget.used, budget.used_by("a")) == (0, 0)


def _interleaved(count: int, size: int) -> tuple[int, int, int]:
    """``count`` uploads of one tenant, each declaring ``size`` bytes, their bytes arriving
    64 KiB at a time in turn (a shared link), under the default budget: how many are read
    whole, how many refused, and the bytes the refused ones had sent."""
    settings = HttpFrontSettings.from_env(ENV)
    budget = BodyBudget(settings.body_budget_bytes, settings.body_tenant_bytes)
    with contextlib.ExitStack() as stack:
        going: list[tuple[Reading, list[int]]] = []
        refused = wasted = 0
        for _ in range(count):
            held = stack.enter_context(budget.reading("t"))
            try:
                held.reserve(size)
            except BodyFull:
                refused += 1
                held.close()
                continue
            going.append((held, [0]))
        read = 0
        while going:
            for held, sent in list(going):
                sent[0] = min(size, sent[0] + (64 << 10))
                try:
                    held.cover(sent[0])
                except BodyFull:
                    refused += 1
                    wasted += sent[0]
                else:
                    if sent[0] < size:
                        continue
                    read += 1
                held.close()
                going.remove((held, sent))
        assert (budget.used, budget.used_by("t")) == (0, 0)
    return read, refused, wasted


@pytest.mark.parametrize(("count", "read"), [(64, 16), (17, 16), (16, 16)])
def test_a_tenants_uploads_past_its_share_are_refused_before_they_send_a_byte(
    count: int, read: int
) -> None:
    """A declared length was only checked, not held: 64 of a tenant's 2 MiB uploads (its
    default in-flight cap at the default body limit) interleaved were all let in, and 48 were
    refused part-way, after 0.56-1.94 MiB each (17: one refused after 1.94 MiB). Now its share
    (32 MiB) holds 16 of them; the rest are refused at once, having sent nothing."""
    assert _interleaved(count, 2 << 20) == (read, count - read, 0)


def test_a_tenants_share_is_a_quarter_or_the_longest_body() -> None:
    settings = HttpFrontSettings.from_env(ENV)
    assert settings.body_tenant_bytes == settings.body_budget_bytes // 4 == 32 << 20
    least = HttpFrontSettings.from_env({**ENV, "HTTP_FRONT_BODY_BUDGET_BYTES": str(12 << 20)})
    assert least.body_tenant_bytes == least.max_json_bytes == 12 << 20


# --- through the front -------------------------------------------------------------------------
async def _connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def _keys(tmp_path: Path) -> dict[str, str]:
    """``serving``'s env for two tenants: ``KEY``'s, tenant-a, and ``OTHER``'s, tenant-b."""
    keys = tmp_path / "two-tenants"
    keys.write_text(f"tenant-a:{hash_key(KEY)}\ntenant-b:{hash_key(OTHER)}\n")
    return {"CACHEMESH_API_KEYS_FILE": str(keys)}


async def _start_upload(front: Served, sent: int) -> asyncio.StreamWriter:
    """Tenant-a's upload declaring the longest body the front reads, its first ``sent`` bytes
    sent, the rest not (a slow client)."""
    _, writer = await _connect(front.base)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"x-api-key: " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(LONGEST)
    )
    writer.write(LONGEST[:sent])
    await writer.drain()
    return writer


async def _until_metric(front: Served, line: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(500):  # until the front has counted it (one try, usually)
            async with session.get(front.metrics) as reply:
                if line in (await reply.text()).splitlines():
                    return
            await asyncio.sleep(0.01)
    raise AssertionError(f"the front's metrics never showed {line!r}")


async def _post_chunked(base: str, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent ``BODY`` chunked (no declared length) as ``key``'s."""
    reader, writer = await _connect(base)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nauthorization: Bearer "
        + key.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked
    )
    return reader, writer


async def _hold_upload(
    front: Served, sent: int = MOST_JSON - 1, reading: int | None = None
) -> asyncio.StreamWriter:
    """``_start_upload``, once the front has taken its ``sent`` bytes (all of the budget but a
    byte, unless told; the whole of tenant-a's share held for it): until the front's bodies
    hold ``reading`` (``sent``)."""
    writer = await _start_upload(front, sent)
    await _until_metric(front, f"cachemesh_http_front_body_bytes_reading {float(reading or sent)}")
    return writer


async def _metric(front: Served, name: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(front.metrics) as reply:
        text = await reply.text()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


async def _refusals(front: Served) -> str:
    """The budget refusals counted (each API's series is exposed at 0 from the start)."""
    lines = await _metric(front, "cachemesh_http_front_body_budget_refusals_total")
    return "\n".join(line for line in lines.splitlines() if not line.endswith(" 0.0"))


# the budget exactly the longest body: one upload holds it all; several of the tenant's at once
BUDGET_ENV = {
    "HTTP_FRONT_BODY_BUDGET_BYTES": str(MOST_JSON),
    "HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY": "8",
}


@pytest.fixture
async def budget_front(tmp_path: Path) -> AsyncIterator[tuple[Served, FakeGateway]]:
    gateway = FakeGateway()
    async with serving(tmp_path, gateway, **BUDGET_ENV, **_keys(tmp_path)) as front:
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
        counted = await _refusals(front)
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
        ("UNAVAILABLE", 529, "tenant-a"),
        ("CANCELLED", 499, "tenant-a"),  # the held upload, its caller gone before the Gateway
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
            if await _refusals(front):
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
    reader, writer = await _post_chunked(front.base, KEY)
    try:
        reply = await asyncio.wait_for(reader.read(), OUTCOME_S)
    finally:
        writer.close()
        held.close()
    assert reply.split(b" ", 2)[1] == b"503", reply[:300]
    assert b"HTTP_FRONT_BODY_BUDGET_BYTES" in reply
    assert gateway.calls == 0


async def test_idle_uploads_of_one_tenant_hold_its_share_only_and_others_are_served(
    tmp_path: Path,
) -> None:
    """11 uploads of one tenant declaring the longest body, their bytes not sent: they took the
    whole budget before a byte came, and every other request got 529 (at t+0, +5, +10 s; 0
    Gateway calls) until ``HTTP_FRONT_BODY_TIMEOUT_S``. Now their declared lengths are held of
    their tenant's share only (2 fit in it, 9 are refused at once) and the front-wide budget
    holds the byte each sent: another tenant is served."""
    env = {"HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY": "64", "HTTP_FRONT_BODY_TIMEOUT_S": "30"}
    async with serving(tmp_path, gateway := FakeGateway(), **env, **_keys(tmp_path)) as front:
        held = [await _start_upload(front, sent=1) for _ in range(11)]
        await _until_metric(front, "cachemesh_http_front_body_bytes_reading 2.0")
        await _until_metric(
            front, 'cachemesh_http_front_body_budget_refusals_total{api="anthropic"} 9.0'
        )
        claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=OTHER, max_retries=0)
        try:
            answer = await claude.messages.create(
                model="sim-large", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await claude.close()
            for writer in held:
                writer.close()
    assert answer.content and gateway.calls == 1


async def test_a_tenants_upload_past_its_share_is_refused_before_its_body_is_sent(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    """A declared length was only checked against the room there was: the tenant's next
    upload was let in and read until the bytes of those before it came, then refused part-way
    (here: never answered before its body came). Now it is refused on its head alone; another
    tenant's, whose bytes the front-wide budget has room for, is read."""
    front, gateway = budget_front
    held = await _hold_upload(front, sent=1)  # tenant-a's share held whole; 1 byte front-wide
    reader, writer = await _connect(front.base)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"x-api-key: "
        + KEY.encode()
        + b"\r\nContent-Length: %d\r\n" % len(BODY)
        + b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=OTHER, max_retries=0)
    try:
        # its head: the rest of the reply's connection lingers, for a body that may still come
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), OUTCOME_S)
        size = re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)
        assert size, head
        reply = head + await reader.readexactly(int(size[1]))
        answer = await gpt.chat.completions.create(
            model="sim-large", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await gpt.close()
        writer.close()
        held.close()
    assert reply.split(b" ", 2)[1] == b"529", reply[:300]
    assert b"HTTP_FRONT_BODY_BUDGET_BYTES" in reply
    assert answer.choices and gateway.calls == 1


async def test_a_chunked_body_with_room_is_read_while_a_declared_one_finds_none(
    budget_front: tuple[Served, FakeGateway],
) -> None:
    """A declared body over the room there is is refused at once; it waited its turn (1 s),
    and while it waited every chunked body was refused, even one with room (here another
    tenant's: the declared ones are tenant-a's, whose share they hold)."""
    front, gateway = budget_front
    held = await _hold_upload(front, sent=MOST_JSON // 2)
    waiting = await _start_upload(front, sent=0)
    await asyncio.sleep(0.1)  # its head read
    reader, writer = await _post_chunked(front.base, OTHER)
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
