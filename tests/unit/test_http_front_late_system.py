"""An OpenAI system message after the last assistant message, no user message after it
(AutoGen's GroupChat asking who speaks next right after an agent's turn): hoisted into the
system text, it left the assistant's message last, the Gateway's prefill. Before: a gpt-4o
row refused "messages[1]: a last assistant message (a prefill ...)", a message the caller
never sent as one, and a Claude row accepted it and continued "Day 1" instead of answering the
system message. Now the front refuses it, naming the system message and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.http_front import openai_api
from services.http_front.errors import ApiError
from tests.unit.test_http_front_app import KEY, FakeGateway, serving

# the auto tiers (sim-small, sim-large) need a replica too
_REPLICAS = "gpt-4o=127.0.0.1:1,sim-small=127.0.0.1:1,sim-large=127.0.0.1:1"
_TURN = [
    {"role": "user", "content": "Plan a trip.", "name": "Admin"},
    {"role": "assistant", "content": "Day 1", "name": "Planner"},
]
_SELECT = {"role": "system", "content": "Read the above conversation. Then select the next role."}


@pytest.mark.parametrize(
    ("messages", "late"),
    [
        ([*_TURN, _SELECT], 2),
        ([{"role": "system", "content": "s"}, *_TURN, {"role": "developer", "content": "d"}], 3),
        ([*_TURN, _SELECT, {"role": "assistant", "content": "Critic"}, _SELECT], 4),
    ],
    ids=["system", "developer", "after-the-last-assistant"],
)
def test_a_late_system_message_that_would_leave_an_assistant_message_last_is_refused(
    messages: list[dict[str, Any]], late: int
) -> None:
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request({"model": "claude-sonnet-4-5", "messages": messages}, 10)
    error = refused.value.body_for("openai", "r")["error"]
    assert error["param"] == f"messages[{late}]"
    assert error["message"].startswith(f"messages[{late}]: a ")
    assert "read as a prefill" in error["message"]


@pytest.mark.parametrize(
    "messages",
    [
        [*_TURN, _SELECT, {"role": "user", "content": "Go on."}],  # a user turn after it
        [*_TURN, {"role": "user", "content": "Too long."}, _SELECT],  # AutoGen's usual order
        [{"role": "system", "content": "s"}, *_TURN],  # the caller's own prefill, as before
    ],
    ids=["user-after", "autogen", "prefill"],
)
def test_other_orders_are_carried_as_before(messages: list[dict[str, Any]]) -> None:
    request, _, _ = openai_api.parse_request({"model": "m", "messages": messages}, 10)
    last = messages[-1]["role"] if messages[-1]["role"] != "system" else "user"
    assert request.messages[-1].role == (pb.ROLE_USER if last == "user" else pb.ROLE_ASSISTANT)


async def test_the_sdk_gets_the_400_and_the_gateway_no_call(tmp_path: Path) -> None:
    fake = FakeGateway()
    async with serving(tmp_path, fake, MODEL_REPLICAS=_REPLICAS) as served:
        client = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        async with client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model="gpt-4o",
                    messages=[*_TURN, _SELECT],  # type: ignore[list-item]
                )
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "messages[2]"
    assert fake.calls == 0
