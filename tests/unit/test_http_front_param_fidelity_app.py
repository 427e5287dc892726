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
    assert fake.calls == 0
