"""ROUTER_KV_CAPACITY_TOKENS, each model replica's KV cache for the ttft policy's eviction model:
unset is no eviction model; a capacity smaller than one 16-token KV block holds no block, so it
means nothing the model can use (0 was refused only as ``must be >= 1, got 0``, and 1-15 were
taken: an 8-token cache counted a 128-token prefix as held). Refused at start-up in one line that
names the variable, the smallest capacity and how to turn the model off."""

from __future__ import annotations

import pytest

from services.common.env import ConfigError, Env
from services.common.kv_blocks import BLOCK_SIZE
from services.router.settings import choice_from_env


@pytest.mark.parametrize("value", ["0", "1", "15", "-1"])
def test_a_capacity_below_one_block_is_refused_saying_what_to_do(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choice_from_env(Env({"ROUTER_KV_CAPACITY_TOKENS": value}))
    message = str(caught.value)
    assert message.startswith("ROUTER_KV_CAPACITY_TOKENS must be at least 16"), message
    assert f"got {value}" in message
    assert "unset it" in message and "MODEL_KV_CAPACITY_BLOCKS" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("environ", "capacity"),
    [
        ({}, None),
        ({"ROUTER_KV_CAPACITY_TOKENS": ""}, None),  # empty is unset
        ({"ROUTER_KV_CAPACITY_TOKENS": str(BLOCK_SIZE)}, BLOCK_SIZE),
        ({"ROUTER_KV_CAPACITY_TOKENS": "1048576"}, 1_048_576),
    ],
)
def test_unset_is_no_eviction_model_and_one_block_or_more_is_taken(
    environ: dict[str, str], capacity: int | None
) -> None:
    assert choice_from_env(Env(environ)).ttft.kv_capacity_tokens == capacity
