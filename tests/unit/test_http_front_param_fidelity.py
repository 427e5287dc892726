"""Each parameter of a caller's request reaches the Gateway as sent, or is refused with a 400
naming it: never dropped or altered unsaid (the front's parse, OpenAI's API)."""

from __future__ import annotations

from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.http_front import openai_api
from services.http_front.errors import ApiError

_ASK = [{"role": "user", "content": "q"}]


def _refusal(body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request({"model": "m", "messages": _ASK, **body}, 10)
    assert refused.value.status_for("openai") == 400
    error: dict[str, Any] = refused.value.body_for("openai", "r")["error"]
    return error


@pytest.mark.parametrize("values", [(7, 9), (9, 7), (8, 8)])
def test_max_tokens_and_max_completion_tokens_together_are_refused(values: tuple[int, int]) -> None:
    """OpenAI answers both at once with a 400; the front took max_completion_tokens and dropped
    max_tokens unsaid (max_tokens 7 with max_completion_tokens 9: answered and billed to 9)."""
    legacy, completion = values
    error = _refusal({"max_tokens": legacy, "max_completion_tokens": completion})
    assert error["param"] == "max_tokens"
    assert "max_completion_tokens" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_parameter_combination"  # OpenAI's (it was null)


@pytest.mark.parametrize(
    ("body", "limit", "field"),
    [
        ({"max_completion_tokens": 9}, 9, "max_completion_tokens"),
        ({"max_tokens": 7}, 7, "max_tokens"),
        ({"max_tokens": 7, "max_completion_tokens": None}, 7, "max_tokens"),
        ({}, 10, None),  # the front's default
    ],
)
def test_either_output_limit_alone_is_carried(
    body: dict[str, Any], limit: int, field: str | None
) -> None:
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request({"model": "m", "messages": _ASK, **body}, 10, origins)
    assert request.max_tokens == limit
    assert origins.max_tokens == field


def test_an_output_limit_out_of_range_names_the_field_the_caller_sent() -> None:
    error = _refusal({"max_completion_tokens": 2**40})
    assert error["param"] == "max_completion_tokens"
    assert error["message"].startswith("max_completion_tokens:")


# Aider (its reminder="sys": the edit-format rules as a system message after the user's
# request) and AutoGen's GroupChat (the conversation, then the select-speaker prompt as a
# system message): both worked, and OpenAI answers them
_AIDER = [
    {"role": "system", "content": "Act as an expert software developer."},
    {"role": "user", "content": "Change get_factorial() to use math.factorial"},
    {"role": "system", "content": "# SEARCH/REPLACE block Rules: ..."},
]
_AUTOGEN = [
    {"role": "system", "content": "You are in a role play game."},
    {"role": "user", "content": "Plan a trip.", "name": "Admin"},
    {"role": "assistant", "content": "Day 1: ...", "name": "Planner"},
    {"role": "user", "content": "Too long.", "name": "Critic"},
    {"role": "system", "content": "Read the above conversation. Then select the next role."},
]


@pytest.mark.parametrize(
    ("messages", "system", "turns"),
    [
        (_AIDER, ["Act as an expert software developer.", "# SEARCH/REPLACE block Rules: ..."], 1),
        (
            _AUTOGEN,
            [
                "You are in a role play game.",
                "Read the above conversation. Then select the next role.",
            ],
            3,
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "developer", "content": "late"}, *_ASK],
            ["late"],
            1,  # the two user messages, one user turn
        ),
    ],
    ids=["aider", "autogen", "developer"],
)
def test_a_system_message_after_the_conversation_began_is_hoisted_into_the_system_text(
    messages: list[dict[str, Any]], system: list[str], turns: int
) -> None:
    """The Gateway's system text comes before all of its messages, so a later system or
    developer message joins it, in order, as Anthropic's OpenAI SDK compatibility layer hoists
    it: refusing it (a 400 for a while) broke Aider and AutoGen's GroupChat, which OpenAI
    answers."""
    request, _, _ = openai_api.parse_request({"model": "m", "messages": messages}, 10)
    assert [block.text for block in request.system] == system
    assert len(request.messages) == turns
    assert request.messages[-1].role == pb.ROLE_USER


def test_system_and_developer_messages_before_the_conversation_are_carried_in_order() -> None:
    request, _, _ = openai_api.parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "d"},
                {"role": "system", "content": [{"type": "text", "text": "s"}]},
                *_ASK,
            ],
        },
        10,
    )
    assert [block.text for block in request.system] == ["d", "s"]
    assert [block.text for block in request.messages[0].content] == ["q"]


_THINKS = frozenset({"gpt-5", "auto"})


@pytest.mark.parametrize("model", sorted(_THINKS))
def test_the_deprecated_max_tokens_to_a_model_that_thinks_by_default_is_refused(model: str) -> None:
    """OpenAI refuses max_tokens for its reasoning models: it counted the answer alone, and
    their limit counts the thinking too. The front sent it on as max_completion_tokens, the
    caller's answer budget spent thinking (cut or empty, and billed)."""
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(
            {"model": model, "messages": _ASK, "max_tokens": 300}, 10, thinks_by_default=_THINKS
        )
    error = refused.value.body_for("openai", "r")["error"]
    assert error["param"] == "max_tokens"
    assert error["message"].startswith(f"max_tokens: not supported by cachemesh for {model}")
    assert "send max_completion_tokens" in error["message"]


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("gpt-5", {"max_completion_tokens": 300}),  # the limit of thinking and answer
        ("gpt-5", {}),  # the front's default
        ("gpt-4o", {"max_tokens": 300}),  # no thinking: the two limits are one
    ],
)
def test_an_output_limit_that_means_what_it_says_is_carried(
    model: str, body: dict[str, Any]
) -> None:
    request, _, _ = openai_api.parse_request(
        {"model": model, "messages": _ASK, **body}, 10, thinks_by_default=_THINKS
    )
    assert request.max_tokens == body.get("max_completion_tokens", body.get("max_tokens", 10))
