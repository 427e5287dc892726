"""A large body is read from JSON and translated to the Gateway's request in a worker thread,
not on the front's event loop: a 2.2 MB body of 60,000 one-letter messages held it ~1 s,
every tenant's requests and /healthz with it. The test looks at which thread translated,
not at times."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.common.auth import hash_key
from services.common.fair_walks import FairWalks
from services.http_front import anthropic_api, bodies, openai_api
from tests.unit.test_fair_walks import Gate
from tests.unit.test_http_front_app import KEY, FakeGateway, serving


def _body(turns: int) -> bytes:
    messages: list[dict[str, Any]] = []
    for _ in range(turns // 2):
        messages += [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messages.append({"role": "user", "content": "q"})
    return json.dumps({"model": "sim-small", "max_tokens": 8, "messages": messages}).encode()


async def test_a_large_body_is_translated_off_the_fronts_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    translated_on: list[tuple[str, bool]] = []  # (api, on the loop's thread)

    def recorded(api: str, translate: Any) -> Any:
        def translating(*args: Any, **kwargs: Any) -> Any:
            on_loop = threading.current_thread() is loop_thread
            assert on_loop or threading.current_thread().name.startswith("front-translate")
            translated_on.append((api, on_loop))
            return translate(*args, **kwargs)

        return translating

    monkeypatch.setattr(
        anthropic_api, "parse_request", recorded("anthropic", anthropic_api.parse_request)
    )
    monkeypatch.setattr(openai_api, "parse_request", recorded("openai", openai_api.parse_request))
    large, small = _body(10_000), _body(2)
    assert len(large) > bodies.TRANSLATE_IN_THREAD_BYTES >= len(small)
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {KEY}",
        "x-api-key": KEY,
        "anthropic-version": "2023-06-01",
    }
    async with (
        serving(tmp_path, FakeGateway(), HTTP_FRONT_MAX_BODY_BYTES=str(1 << 20)) as front,
        aiohttp.ClientSession() as session,
    ):
        for path in ("/v1/messages", "/v1/chat/completions"):
            for body in (large, small):
                headers_for = {k: v for k, v in headers.items() if k != "authorization"}
                sent = headers_for if path == "/v1/messages" else headers
                async with session.post(front.base + path, data=body, headers=sent) as reply:
                    assert reply.status == 200, await reply.text()
    assert translated_on == [
        ("anthropic", False),
        ("anthropic", True),
        ("openai", False),
        ("openai", True),
    ]


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(3_000):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never came")


def _asking(text: str) -> bytes:
    """A large body whose last question is ``text``."""
    body = json.loads(_body(10_000))
    body["messages"][-1]["content"] = text
    return json.dumps(body).encode()


async def test_tenants_large_bodies_are_translated_in_turn_not_first_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenant b's large body waits one walk per tenant, not behind tenant a's whole flood (on
    one first-come thread, b's 76 kB request took 1.03 s behind a's 10 x 1 MB, 0.015 s alone).
    The test looks at the order of the translations, the first held until all are queued."""
    made: list[FairWalks] = []

    class Recorded(FairWalks):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            made.append(self)

    monkeypatch.setattr(bodies, "FairWalks", Recorded)
    gate = Gate()
    parse = anthropic_api.parse_request

    entered: list[str] = []  # translations begun, the first held at the gate

    def held(body: dict[str, Any], **kwargs: Any) -> Any:
        entered.append(body["messages"][-1]["content"])
        gate.walk(body["messages"][-1]["content"])
        return parse(body, **kwargs)

    monkeypatch.setattr(anthropic_api, "parse_request", held)
    key_b = "cm_test-key-of-tenant-b"
    keys = tmp_path / "keys"
    keys.write_text(f"tenant-a:{hash_key(KEY)}\ntenant-b:{hash_key(key_b)}\n")
    async with (
        serving(
            tmp_path,
            FakeGateway(),
            CACHEMESH_API_KEYS_FILE=str(keys),
            HTTP_FRONT_MAX_BODY_BYTES=str(1 << 20),
            HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY="16",
        ) as front,
        aiohttp.ClientSession() as session,
    ):

        async def send(key: str, text: str) -> int:
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
            url = front.base + "/v1/messages"
            async with session.post(url, data=_asking(text), headers=headers) as reply:
                return reply.status

        flood = [asyncio.ensure_future(send(KEY, f"a{i}")) for i in range(6)]
        await _until(lambda: len(made) == 1 and bool(entered) and made[0].count("tenant-a") == 6)
        other = asyncio.ensure_future(send(key_b, "b0"))
        await _until(lambda: made[0].count("tenant-b") == 1)
        gate.open()
        assert await asyncio.gather(other, *flood) == [200] * 7
    # a0's translation held the thread; b0's came after at most one more of a's: first-come
    # put it after all six of a's
    assert gate.order[0].startswith("a") and "b0" in gate.order[1:3], gate.order
