"""``anthropic-beta`` is accepted and not carried (README "What goes where"): the SDK's
``client.beta.messages`` streams as ``client.messages`` does, whatever betas it names; the
fields a beta unlocks are refused by name, in Anthropic's words."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from tests.unit.test_http_front_app import ASK, KEY, FakeGateway, serving

BETAS = ["fine-grained-tool-streaming-2025-05-14", "a-beta-newer-than-the-front-2099-01-01"]


async def test_the_sdks_beta_messages_stream_is_served_as_without_betas(tmp_path: Path) -> None:
    fake = FakeGateway()
    async with serving(tmp_path, fake) as served:
        claude = anthropic.AsyncAnthropic(base_url=served.base, api_key=KEY, max_retries=0)
        try:
            async with claude.beta.messages.stream(
                model="sim-large", max_tokens=50, messages=ASK, betas=BETAS
            ) as stream:
                message = await stream.get_final_message()
            sent = stream.response.request.headers["anthropic-beta"]
            with pytest.raises(anthropic.BadRequestError) as refused:
                await claude.beta.messages.create(
                    model="sim-large",
                    max_tokens=50,
                    messages=ASK,
                    betas=["context-management-2025-06-27"],
                    extra_body={"context_management": {"edits": []}},
                )
        finally:
            await claude.close()
    assert sent == ",".join(BETAS)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 4
    assert fake.calls == 1  # the refusal is the front's own
    said = refused.value.body
    assert isinstance(said, dict)
    assert said["error"]["message"] == "context_management: Extra inputs are not permitted"
    assert "anthropic-beta" not in dict(fake.metadata)
