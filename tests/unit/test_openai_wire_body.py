"""The bodies the OpenAI adapter builds for OpenAI's rows, against what OpenAI refuses before it
answers (``tests.providers.openai_wire.refusal``, the loopback server's checks)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelSpec, load_model_table
from services.model.providers.openai_wire import chat_params
from tests.providers import openai_wire

TABLE = load_model_table()
REQUEST = pb.CompleteRequest(
    max_tokens=16,
    messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi")])],
)


def with_fields(row: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({**TABLE.models[row].model_dump(exclude_unset=True), **fields})


@pytest.mark.parametrize(
    "row", [row for row, spec in TABLE.models.items() if spec.provider == "openai"]
)
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_every_openai_row_is_sent_a_body_openai_takes(row: str, temperature: float | None) -> None:
    """The body the adapter builds for each of OpenAI's shipped rows (a temperature the router
    lets through to it: none, or 1) is one the loopback server, which refuses what OpenAI
    refuses before answering, takes."""
    request = pb.CompleteRequest()
    request.CopyFrom(REQUEST)
    request.model = row
    request.cache.prompt_cache_key = "k" * 64  # for_provider's: a 64-character digest
    if temperature is not None:
        request.temperature = temperature
    body = {**chat_params(TABLE.models[row], request), "stream": True}
    body["stream_options"] = {"include_usage": True}
    assert openai_wire.refusal({}, body) is None


def test_an_openai_reasoning_row_limited_by_max_tokens_is_refused_at_start_up() -> None:
    """OpenAI refuses ``max_tokens`` for its reasoning models (400 unsupported_parameter): a
    row that thinks by default sending it would have every request refused. Before, the table
    loaded and each request was OpenAI's 400."""
    with pytest.raises(ValidationError, match='set max_tokens_param = "max_completion_tokens"'):
        with_fields("gpt-5", max_tokens_param="max_tokens")
    with_fields("gpt-4o", max_tokens_param="max_tokens")  # no reasoning model: it takes it
