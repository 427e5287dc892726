"""``anthropic-version``: Anthropic answers a version it does not have with a 400
``invalid_request_error`` (``anthropic-version: "2023-10-01" is not a valid version``), whatever
date it is; the front took any date (a caller that invented one was served here and refused
there). It now takes Anthropic's versions, and its refusal names them; and, as it does unknown
betas, a date after the newest it knows (a client newer than the front: refused, every request
of an SDK major that moved to a later version would be a 400), served as the newest and logged
once a process."""

from __future__ import annotations

import datetime
import logging
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


# a made-up date up to the newest version (2026-10-20: the day before it), a date after
# tomorrow (no version is dated in the future: 2062-10-21 is a typo of 2026-10-21), or no real
# date written YYYY-MM-DD
@pytest.mark.parametrize(
    "version",
    [
        "2023-10-01",
        "2024-10-22",
        "2026-10-20",
        "2062-10-21",
        "2099-01-01",
        "2027-02-30",
        "20271005",
        "2027-1-05",
        "latest",
    ],
)
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
    assert "or a date after 2026-10-21" in message
    assert fake.calls == 0  # refused before the Gateway


async def test_a_date_after_the_newest_version_is_served_and_logged_once(
    front: tuple[str, FakeGateway], caplog: pytest.LogCaptureFixture
) -> None:
    """A client newer than the front (an SDK major sending a version after 2026-10-21) is
    served as the newest; the operator is told once a process to upgrade the front (a
    WARNING naming the version), not on every request."""
    base, fake = front
    caplog.set_level(logging.WARNING, logger="cachemesh.http_front")
    for version in ("2026-10-22", "2026-10-23", "2026-10-22"):
        status, body = await _post(base, version)
        assert status == 200, body  # 400 before: "is not a valid version"
        assert body["type"] == "message"
    assert fake.calls == 3
    told = [r.getMessage() for r in caplog.records if "anthropic-version" in r.getMessage()]
    assert len(told) == 1, told
    assert told[0].startswith("http-front: a client sent anthropic-version 2026-10-22, later ")
    assert "served as 2026-10-21" in told[0] and "upgrade the front" in told[0]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.getMessage() in told)
    assert KEY not in caplog.text


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


def test_a_later_date_is_served_up_to_tomorrow_only() -> None:
    """A date after the newest version is a newer client's only if it has come: a version is
    never dated in the future, so a date after tomorrow (UTC; the caller may be a day ahead)
    is a typo (2062-10-21 for 2026-10-21) and refused as Anthropic refuses it; it was served."""
    from services.http_front.admission import AnthropicVersions
    from services.http_front.errors import ApiError

    noon = datetime.datetime(2027, 3, 10, 12, tzinfo=datetime.UTC).timestamp()
    versions = AnthropicVersions(lambda: noon)
    for served in ("2026-10-22", "2027-03-10", "2027-03-11"):
        assert versions.served(served) == "2026-10-21", served
    for refused in ("2027-03-12", "2062-10-21"):
        with pytest.raises(ApiError, match="is not a valid version"):
            versions.served(refused)
