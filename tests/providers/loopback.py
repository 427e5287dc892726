"""The loopback wire server of both providers with their default answers, started and
stopped around a module's tests (``yield from serving()`` in a module-scoped fixture)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

from services.model.providers.api import ProviderApi
from tests.providers import anthropic_wire, openai_wire
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import WireServer


def serving(rejected_openai_key: str = "x") -> Iterator[WireServer]:
    """Anthropic's and OpenAI's default answers; a refused key's body names
    ``rejected_openai_key`` as OpenAI's does (masked)."""
    wire = WireServer(
        {"anthropic": anthropic_wire.default, "openai": openai_wire.default},
        {"anthropic": anthropic_wire.REJECTED, "openai": openai_wire.rejected(rejected_openai_key)},
        {"anthropic": anthropic_wire.refusal, "openai": openai_wire.refusal},
    )
    wire.start()
    yield wire
    wire.stop()


async def anthropic_replica(wire: WireServer, model: str) -> AsyncIterator[ProviderApi]:
    """An Anthropic replica of ``model`` on ``wire`` (its record cleared first), closed after
    (``async for api in anthropic_replica(...): yield api`` in a fixture)."""
    wire.reset()
    settings = provider_settings("anthropic", wire.base, "sk-ant-loopback-0123456789abcdef")
    api = provider_replica(settings, [model], clock=lambda: 1000.0)
    yield api
    await api.close()


def post_messages(wire: WireServer, body: dict[str, Any], version: str | None) -> tuple[int, Any]:
    """A raw ``POST /v1/messages`` to the loopback Anthropic server under ``version`` (None:
    no ``anthropic-version`` header): its status and JSON error body (None: an answer)."""
    headers = {"content-type": "application/json", "x-api-key": "sk-ant-loopback"}
    if version is not None:
        headers["anthropic-version"] = version
    sent = urllib.request.Request(
        wire.base + "/v1/messages", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(sent, timeout=30) as answer:
            answer.read()
            return answer.status, None
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())
