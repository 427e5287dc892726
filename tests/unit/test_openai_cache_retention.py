"""OpenAI's prompt cache retention (https://developers.openai.com/api/docs/guides/prompt-caching):
in-memory (an unused prefix kept 5-10 minutes) or extended (``prompt_cache_retention: "24h"``),
which the models supporting it (gpt-5, gpt-5.4, gpt-4.1 among the shipped rows) may apply by
default. A row's ``prompt_cache_retention`` is sent explicitly and modelled: the prediction and
the provider follow one policy."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import ModelSpec, load_model_table
from services.model.providers.openai_wire import chat_params
from services.prefix_cache.auto_rules import plan_openai
from services.prefix_cache.rules import settle
from services.prefix_cache.warm import WarmStore

TABLE = load_model_table()
EXTENDED = ("gpt-5", "gpt-5-4", "gpt-4-1")  # OpenAI lists them for extended retention
REQUEST = pb.CompleteRequest(
    model="gpt-5",
    max_tokens=16,
    messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi")])],
)


def with_fields(row: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({**TABLE.models[row].model_dump(exclude_unset=True), **fields})


@pytest.mark.parametrize("row", EXTENDED)
def test_rows_that_may_default_to_24h_send_their_in_memory_policy(row: str) -> None:
    """Their retention was left to OpenAI (24h by default for an organisation without ZDR)
    while prefix-cache modelled 300 s: a prefix idle 10 minutes was read by the provider and
    billed as full input."""
    spec = TABLE.models[row]
    assert spec.prompt_cache_retention == "in_memory"
    assert chat_params(spec, REQUEST)["prompt_cache_retention"] == "in_memory"
    assert all(w.ttl_ms == 300_000 for w in plan_openai(list(range(2000)), spec).writes)


@pytest.mark.parametrize("row", ["gpt-4o", "gpt-4-1-mini", "gpt-5-nano", "local-small"])
def test_rows_without_a_policy_send_no_field(row: str) -> None:
    """Models without extended retention (and OpenAI-compatible engines) are sent nothing new."""
    assert "prompt_cache_retention" not in chat_params(TABLE.models[row], REQUEST)


async def test_a_row_configured_for_24h_sends_it_and_keeps_a_prefix_24_hours(
    warm_store: WarmStore,
) -> None:
    spec = with_fields("gpt-5", prompt_cache_retention="24h")
    assert chat_params(spec, REQUEST)["prompt_cache_retention"] == "24h"
    clock, ids, scope = ManualClock(), list(range(1100)), ("tenant-a", "gpt-5", "key=")

    async def read() -> int:
        plan = plan_openai(ids, spec)
        hit = await warm_store.settle(scope, plan.probes, plan.writes, clock.now_ms())
        return settle(plan, hit.tokens if hit else 0).read_tokens

    assert await read() == 0
    clock.advance(s=600)  # past the in-memory retention
    assert await read() == 1024
    clock.advance(s=86_399)
    assert await read() == 1024
    clock.advance(s=86_400)
    assert await read() == 0


def test_the_policy_is_openais_only_and_one_of_its_values() -> None:
    with pytest.raises(ValidationError, match="prompt_cache_retention"):
        with_fields("claude-sonnet-4-5", prompt_cache_retention="in_memory")
    with pytest.raises(ValidationError, match="prompt_cache_retention"):
        with_fields("gpt-5", prompt_cache_retention="1h")
