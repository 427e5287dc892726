"""Where an OpenAI-compatible engine streams a reasoning model's thinking: ``reasoning_content``
(llama-server, DeepSeek, older vLLM) or ``reasoning`` (newer vLLM, OpenRouter, Ollama), fields
the SDK does not declare. A delta carrying the same thinking in both (vLLM's backward-compatible
deltas) is one piece, never counted twice; a field that is not text is no thinking."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from services.model.providers.openai_wire import reasoning_of


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"reasoning_content": "Weigh it."}, "Weigh it."),
        ({"reasoning": "Weigh it."}, "Weigh it."),
        ({"reasoning_content": "Weigh it.", "reasoning": "Weigh it."}, "Weigh it."),
        ({"reasoning_content": "", "reasoning": "Weigh it."}, "Weigh it."),
        ({"reasoning_content": None, "content": "Paris."}, ""),
        ({"reasoning": {"effort": "high"}}, ""),  # not text
        ({"content": "Paris."}, ""),
    ],
)
def test_a_deltas_thinking_is_read_once(fields: dict[str, Any], expected: str) -> None:
    assert reasoning_of(ChoiceDelta.model_validate(fields)) == expected
