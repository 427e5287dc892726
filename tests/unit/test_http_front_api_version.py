"""``anthropic-version``: Anthropic answers a version it does not have with a 400
``invalid_request_error`` (``anthropic-version: "2023-10-01" is not a valid version``), whatever
date it is; the front took any date (a caller that invented one was served here and refused
there). It now takes Anthropic's versions only, and its refusal names them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from services.http_front.anthropic_api import VERSIONS
from tests.unit.test_http_front_app import ASK, KEY, FakeGateway, serving


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[tuple[str, FakeGateway]]:
    fake = FakeGateway()
    async with serving(tmp_path, fake) as served:
        yield served.base, fake


async def _post(base: str, version: str) -> tuple[int, dict[str, Any]]:
    sent = {"model": "sim-large", "max_tokens": 9, "messages": ASK}
    headers = {"x-api-key": KEY, "anthropic-version": version}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/messages", json=sent, headers=headers) as reply,
    ):
        return reply.status, await reply.json()


@pytest.mark.parametrize("version", ["2023-10-01", "2024-10-22", "2099-01-01", "latest"])
async def test_a_version_anthropic_does_not_have_is_refused_naming_those_it_has(
    front: tuple[str, FakeGateway], version: str
) -> None:
    base, fake = front
    status, body = await _post(base, version)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert message.startswith(f'anthropic-version: "{version}" is not a valid version')
    for known in ("2023-01-01", "2023-06-01", "2026-10-21"):
        assert known in message
    assert fake.calls == 0  # refused before the Gateway


@pytest.mark.parametrize("version", ["2023-01-01", "2023-06-01", "2026-10-21"])
async def test_each_version_anthropic_has_is_served(
    front: tuple[str, FakeGateway], version: str
) -> None:
    base, fake = front
    status, body = await _post(base, version)
    assert status == 200, body
    assert body["type"] == "message" and fake.calls == 1


async def test_the_sdks_own_version_is_one_the_front_takes(
    front: tuple[str, FakeGateway],
) -> None:
    """The installed SDK sends its version on every request: a front that refused it would
    refuse every request of that SDK."""
    base, fake = front
    assert ANTHROPIC_API_VERSION in VERSIONS
    client = anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=0)
    try:
        answer = await client.messages.create(model="sim-large", max_tokens=9, messages=ASK)
    finally:
        await client.close()
    assert answer.stop_reason == "tool_use" and fake.calls == 1
