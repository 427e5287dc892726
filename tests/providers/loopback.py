"""The loopback wire server of both providers with their default answers, started and
stopped around a module's tests (``yield from serving()`` in a module-scoped fixture)."""

from __future__ import annotations

from collections.abc import Iterator

from tests.providers import anthropic_wire, openai_wire
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
