"""Parameter fidelity through the front process, with the official openai SDK, in front of a
fake Gateway: a limit that would change meaning on its way is refused before the Gateway."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.unit.test_http_front_app import ASK, KEY, FakeGateway, serving

# gpt-5 thinks by default (its row's thinks_by_default); gpt-4o does not
_REPLICAS = "gpt-5=127.0.0.1:1,gpt-4o=127.0.0.1:1,sim-small=127.0.0.1:1,sim-large=127.0.0.1:1"


@pytest.mark.parametrize(
    ("model", "limit", "refused"),
    [
        ("gpt-5", {"max_tokens": 300}, True),
        ("gpt-5", {"max_completion_tokens": 300}, False),
        ("gpt-4o", {"max_tokens": 300}, False),
    ],
)
async def test_the_deprecated_max_tokens_reaches_no_model_that_thinks_by_default(
    tmp_path: Path, model: str, limit: dict[str, int], refused: bool
) -> None:
    """gpt-5's limit counts its thinking, OpenAI's deprecated max_tokens the answer alone (so
    OpenAI refuses it for its reasoning models): the front sent max_tokens 300 to gpt-5 as the
    Gateway's max_tokens, which the adapter sends as max_completion_tokens."""
    fake = FakeGateway()
    async with serving(tmp_path, fake, MODEL_REPLICAS=_REPLICAS) as served:
        client = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        async with client:
            ask = client.chat.completions.create(model=model, messages=ASK, extra_body=limit)
            if not refused:
                await ask
                assert fake.calls == 1
                return
            with pytest.raises(openai.BadRequestError) as error:
                await ask
    body = error.value.body
    assert isinstance(body, dict)
    assert body["param"] == "max_tokens"
    assert body["message"].startswith("max_tokens: not supported by cachemesh for gpt-5")
    assert body["code"] == "unsupported_parameter"  # OpenAI's (it was null)
    assert fake.calls == 0


# Aider's reminder="sys" (edit rules after the user's request) and AutoGen's GroupChat (the
# select-speaker prompt after the conversation): a system message after the conversation began
_LATE_SYSTEM = {
    "aider": [
        {"role": "system", "content": "Act as an expert software developer."},
        {"role": "user", "content": "Change get_factorial() to use math.factorial"},
        {"role": "system", "content": "# SEARCH/REPLACE block Rules: ..."},
    ],
    "autogen": [
        {"role": "system", "content": "You are in a role play game."},
        {"role": "user", "content": "Plan a trip.", "name": "Admin"},
        {"role": "assistant", "content": "Day 1: ...", "name": "Planner"},
        {"role": "user", "content": "Too long.", "name": "Critic"},
        {"role": "system", "content": "Read the above conversation. Then select the next role."},
    ],
}


@pytest.mark.parametrize("client", sorted(_LATE_SYSTEM))
async def test_a_late_system_message_of_aider_or_autogen_is_answered(
    tmp_path: Path, client: str
) -> None:
    """OpenAI answers them; the front refused them with a 400 for a while. The late system
    message joins the Gateway's system text (hoisted, as Anthropic's OpenAI SDK compatibility
    layer does)."""
    fake = FakeGateway()
    messages = _LATE_SYSTEM[client]
    async with serving(tmp_path, fake, MODEL_REPLICAS=_REPLICAS) as served:
        openai_client = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        async with openai_client:
            answer = await openai_client.chat.completions.with_raw_response.create(
                model="gpt-4o",
                messages=messages,  # type: ignore[arg-type]
            )
    assert answer.status_code == 200
    assert fake.received is not None
    system = [m["content"] for m in messages if m["role"] == "system"]
    assert [block.text for block in fake.received.system] == system
