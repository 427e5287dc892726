"""A large body is read from JSON and translated to the Gateway's request in a worker thread,
not on the front's event loop: a 2.2 MB body of 60,000 one-letter messages held it ~1 s,
every tenant's requests and /healthz with it. The test looks at which thread translated,
not at times."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.http_front import anthropic_api, handlers, openai_api
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
    assert len(large) > handlers.TRANSLATE_IN_THREAD_BYTES >= len(small)
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
