"""A model's tool call round-trips through the HTTP front on the running stack.

The simulator never answers with a tool call, so here the model is a provider replica whose
loopback server streams a real Anthropic tool_use; the official SDK, pointed at the HTTP front,
receives it as its own ToolUseBlock, sends the tool's result back, and gets the final answer.
"""

from __future__ import annotations

import uuid
from typing import Any

import anthropic
import openai
import pytest

from cachemesh import Client, InvalidRequestError, build_request
from cachemesh.retry_info import UNSUPPORTED_VALUE
from tests.integration.provider_stack import ProviderStack
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

_TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "The weather at a place.",
        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
    }
]


def _script_tool_call(providers: ProviderStack, call_id: str, pieces: list[str]) -> None:
    """Claude's next answer: a line of text, then a get_weather call of ``pieces``."""
    usage = anthropic_wire.Usage(input_tokens=40, output_tokens=12)
    call = anthropic_wire.ToolCall(call_id, "get_weather", pieces)
    providers.server.script(
        "anthropic",
        Reply(
            events=anthropic_wire.stream(
                "claude-sonnet-4-5-20250929", ["Let me check. "], usage,
                stop_reason="tool_use", tool=call,
            )
        ),
    )  # fmt: skip


def test_a_tool_call_round_trips_through_the_http_front(providers: ProviderStack) -> None:
    usage = anthropic_wire.Usage(input_tokens=40, output_tokens=12)
    _script_tool_call(providers, "toolu_front01", ['{"location":', ' "Oslo"}'])
    front = f"http://{providers.stack.addresses['http-front']}"
    client = anthropic.Anthropic(
        base_url=front, api_key=providers.stack.keys["tenant-a"], max_retries=0
    )
    ask: Any = {"role": "user", "content": "Do I need a coat in Oslo today?"}
    first = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=128,
        tools=_TOOLS,
        messages=[ask],
    )
    assert first.stop_reason == "tool_use"
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert (use.id, use.name, use.input) == ("toolu_front01", "get_weather", {"location": "Oslo"})

    providers.server.script(
        "anthropic",
        Reply(
            events=anthropic_wire.stream(
                "claude-sonnet-4-5-20250929", ["Yes, it is 2 degrees."], usage
            )
        ),
    )
    turns: list[Any] = [
        ask,
        {"role": "assistant", "content": [use.model_dump()]},  # the SDK's block, passed back
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "2 C"}],
        },
    ]
    second = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=128, tools=_TOOLS, messages=turns
    )
    assert second.stop_reason == "end_turn"
    assert "".join(b.text for b in second.content if b.type == "text") == "Yes, it is 2 degrees."
    sent = providers.server.seen_by("anthropic")[-1].body
    assert sent["messages"][1]["content"][-1]["type"] == "tool_use"  # the call went back up
    assert sent["messages"][2]["content"][0]["tool_use_id"] == "toolu_front01"


@pytest.mark.parametrize("arguments", ['{"location": "Oslo \\ud83d"}', '{"location": NaN}'])
def test_a_tool_call_json_has_not_is_answered_once_and_kept_visibly(
    providers: ProviderStack, arguments: str
) -> None:
    """The model's tool call holds what Python's json reads but JSON has not (a lone UTF-16
    surrogate escape: a string cut inside an emoji; NaN). It reaches the SDK kept as
    ``_unparsed_arguments``, in one model call: it was a 500 after the answer was billed, which
    the SDK's default policy retried twice (three model calls, three bills), or a NaN in the
    body that the next turn could not send back."""
    _script_tool_call(providers, "toolu_front02", [arguments])
    front = f"http://{providers.stack.addresses['http-front']}"
    client = anthropic.Anthropic(base_url=front, api_key=providers.stack.keys["tenant-a"])
    ask: Any = {"role": "user", "content": f"Do I need a coat? {uuid.uuid4().hex[:8]}"}
    calls = len(providers.server.seen_by("anthropic"))
    first = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=128, tools=_TOOLS, messages=[ask]
    )
    assert len(providers.server.seen_by("anthropic")) == calls + 1
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert use.input == {"_unparsed_arguments": arguments}
    turns: list[Any] = [
        ask,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id}]},
    ]
    client.messages.create(model="claude-sonnet-4-5", max_tokens=128, tools=_TOOLS, messages=turns)
    assert len(providers.server.seen_by("anthropic")) == calls + 2  # the next turn is taken
    client.close()


def test_openais_temperature_range_reaches_an_openai_model_unclamped(
    providers: ProviderStack,
) -> None:
    """OpenAI takes a temperature in [0, 2]: through the OpenAI front a value above 1 reaches
    an OpenAI model as sent; to an Anthropic model (whose API takes [0, 1]) it is a 400 that
    names the model's range, never silently clamped."""
    front = f"http://{providers.stack.addresses['http-front']}/v1"
    client = openai.OpenAI(base_url=front, api_key=providers.stack.keys["tenant-a"], max_retries=0)
    ask: Any = [{"role": "user", "content": f"Be creative {uuid.uuid4().hex[:8]}"}]
    reply = client.chat.completions.create(
        model="gpt-4o-mini", temperature=1.5, max_tokens=32, messages=ask
    )
    assert reply.choices[0].message.content
    sent = [s.body for s in providers.server.seen_by("openai") if ask[0]["content"] in str(s.body)]
    assert sent and sent[-1]["temperature"] == 1.5
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="claude-sonnet-4-5", temperature=1.5, max_tokens=32, messages=ask
        )
    assert "temperature: must be within [0, 1] for claude-sonnet-4-5" in refused.value.message


def test_the_python_clients_refusal_of_an_unsupported_value_carries_its_reason(
    providers: ProviderStack,
) -> None:
    """The same refusal through the router to the Python client: an ``InvalidRequestError``
    whose ``reason`` is the Gateway's ``UNSUPPORTED_VALUE``, so a caller can tell it without
    matching the message (before, it had no ``reason``); another bad field has none, and
    OpenAI is not called."""
    ask = f"Think it over {uuid.uuid4().hex[:8]}"
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        request = build_request(ask, model="gpt-5", max_tokens=64)
        request.temperature = 0.5
        with pytest.raises(InvalidRequestError) as refused:
            client.complete(request)
        assert refused.value.reason == UNSUPPORTED_VALUE
        assert refused.value.message.startswith("temperature: gpt-5 takes only its default, 1")
        request = build_request(ask, model="gpt-5", max_tokens=0)
        with pytest.raises(InvalidRequestError) as malformed:
            client.complete(request)
        assert "max_tokens" in malformed.value.message and malformed.value.reason is None
    assert [s for s in providers.server.seen_by("openai") if ask in str(s.body)] == []


def test_an_openai_reasoning_model_is_sent_its_default_temperature_only(
    providers: ProviderStack,
) -> None:
    """OpenAI's reasoning models refuse a temperature but 1 (the loopback server refuses it as
    OpenAI does: 400 ``unsupported_value``): the Gateway refuses it first, a 400 naming the
    model and what to send, and OpenAI is not called; a temperature of 1 is sent and answered.
    Before, each such request went to OpenAI and came back as its 400."""
    front = f"http://{providers.stack.addresses['http-front']}/v1"
    client = openai.OpenAI(base_url=front, api_key=providers.stack.keys["tenant-a"], max_retries=0)
    ask: Any = [{"role": "user", "content": f"Think it over {uuid.uuid4().hex[:8]}"}]

    def sent() -> list[dict[str, Any]]:
        return [
            s.body for s in providers.server.seen_by("openai") if ask[0]["content"] in str(s.body)
        ]

    for _ in range(3):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="gpt-5", temperature=0.5, max_completion_tokens=64, messages=ask
            )
        error: Any = refused.value.body
        assert error["message"] == (
            "temperature: gpt-5 takes only its default, 1 (its provider refuses any other value "
            "for it); omit temperature or send 1, got 0.5"
        )
        assert (error["type"], error["param"]) == ("invalid_request_error", "temperature")
        assert error["code"] == "unsupported_value"  # OpenAI's (before, null)
    assert sent() == []
    reply = client.chat.completions.create(
        model="gpt-5", temperature=1, max_completion_tokens=64, messages=ask
    )
    assert reply.choices[0].message.content
    (body,) = sent()
    assert body["temperature"] == 1 and body["max_completion_tokens"] == 64


def test_claude_sonnet_5_is_sent_its_default_temperature_only(providers: ProviderStack) -> None:
    """Claude Sonnet 5 refuses a sampling parameter but its default under every version (the
    loopback server refuses it as Anthropic does: 400 "`temperature` is deprecated for this
    model."): the Gateway refuses it first through either API, a 400 naming the model and
    what to send (OpenAI's shape with OpenAI's ``code``), and Anthropic is not called; a
    temperature of 1 is sent and answered. Before, each went to Anthropic and came back as
    its 400."""
    front = f"http://{providers.stack.addresses['http-front']}"
    key = providers.stack.keys["tenant-a"]
    claude = anthropic.Anthropic(base_url=front, api_key=key, max_retries=0)
    gpt = openai.OpenAI(base_url=f"{front}/v1", api_key=key, max_retries=0)
    ask = f"Think it over {uuid.uuid4().hex[:8]}"
    messages: Any = [{"role": "user", "content": ask}]
    said = (
        "temperature: claude-sonnet-5 takes only its default, 1 (its provider refuses any other "
        "value for it); omit temperature or send 1, got 0.5"
    )
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(
            model="claude-sonnet-5",
            max_tokens=32,
            messages=messages,
            extra_headers={"anthropic-version": "2023-06-01"},
            extra_body={"temperature": 0.5},
        )
    body: Any = refused.value.body
    assert body["error"] == {"type": "invalid_request_error", "message": said}
    with pytest.raises(openai.BadRequestError) as refused_openai:
        gpt.chat.completions.create(
            model="claude-sonnet-5",
            temperature=0.5,
            max_completion_tokens=32,
            messages=messages,
        )
    error: Any = refused_openai.value.body
    assert (error["message"], error["param"], error["code"]) == (
        said,
        "temperature",
        "unsupported_value",
    )
    assert [s for s in providers.server.seen_by("anthropic") if ask in str(s.body)] == []
    reply = gpt.chat.completions.create(
        model="claude-sonnet-5", temperature=1, max_completion_tokens=32, messages=messages
    )
    assert reply.choices[0].message.content
    sent = [s for s in providers.server.seen_by("anthropic") if ask in str(s.body)]
    assert [(s.status, s.body["temperature"]) for s in sent] == [(200, 1)]
    claude.close()
    gpt.close()


def test_a_temperature_reaches_claude_under_the_version_that_takes_it(
    providers: ProviderStack,
) -> None:
    """A temperature the front takes (the Anthropic SDK pinned to anthropic-version
    2023-06-01, or the OpenAI front) is answered by a Claude model: the replica sends it under
    2023-06-01, since its SDK's own version (2026-10-21) refuses it. Before, both were a 400
    from the provider, ``temperature: Extra inputs are not permitted``."""
    front = f"http://{providers.stack.addresses['http-front']}"
    key = providers.stack.keys["tenant-a"]
    claude = anthropic.Anthropic(base_url=front, api_key=key, max_retries=0)
    gpt = openai.OpenAI(base_url=f"{front}/v1", api_key=key, max_retries=0)
    asks = [f"Be brief {uuid.uuid4().hex[:8]}" for _ in range(2)]
    answer = claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=32,
        messages=[{"role": "user", "content": asks[0]}],
        extra_headers={"anthropic-version": "2023-06-01"},
        extra_body={"temperature": 0.0},
    )
    assert answer.content
    reply = gpt.chat.completions.create(
        model="claude-sonnet-4-5",
        temperature=0.4,
        max_tokens=32,
        messages=[{"role": "user", "content": asks[1]}],
    )
    assert reply.choices[0].message.content
    for ask, temperature in zip(asks, (0.0, 0.4), strict=True):
        sent = [s for s in providers.server.seen_by("anthropic") if ask in str(s.body)]
        assert [(s.status, s.headers["anthropic-version"]) for s in sent] == [(200, "2023-06-01")]
        assert sent[0].body["temperature"] == temperature
    claude.close()
    gpt.close()


def test_a_providers_words_in_a_refusal_reach_either_front_as_it_said_them(
    providers: ProviderStack,
) -> None:
    """An OpenAI model's 400, passed on by the Gateway ("openai refused the request (400):
    ..."), names OpenAI's request by its own indices (the system message counted): each front
    rewrote an unquoted path of it as if it were the Gateway's, the Messages API's into its
    dotted form (messages.2), Chat Completions' into the caller's message of the Gateway's
    index (messages[3]). Both show the provider's words as it said them."""
    theirs = (
        "Invalid parameter: Duplicate value for 'tool_call_id' of 'c1', in messages[2] and "
        "messages[3]."
    )
    key = providers.stack.keys["tenant-a"]
    base = f"http://{providers.stack.addresses['http-front']}"
    question = f"Look it up {uuid.uuid4().hex[:8]}"
    said: list[str] = []
    for _ in range(2):
        providers.server.script(
            "openai", openai_wire.error(400, "invalid_request_error", theirs, param="messages")
        )
    claude = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as by_claude:
        claude.messages.create(
            model="gpt-4o-mini",
            max_tokens=32,
            system="s",
            messages=[
                {"role": "user", "content": question},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": question},
            ],
        )
    assert isinstance(by_claude.value.body, dict)
    said.append(by_claude.value.body["error"]["message"])
    gpt = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as by_gpt:
        gpt.chat.completions.create(
            model="gpt-4o-mini",
            max_tokens=32,
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": question},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": question},
            ],
        )
    said.append(by_gpt.value.message)
    assert [f"refused the request (400): {theirs}" in message for message in said] == [
        True,
        True,
    ], said


_OPENAI_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather at a place.",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


def _sent_with(providers: ProviderStack, api: str, text: str) -> list[dict[str, Any]]:
    return [s.body for s in providers.server.seen_by(api) if text in str(s.body)]


def test_a_forced_tool_choice_reaches_anthropic_and_its_call_the_sdk(
    providers: ProviderStack,
) -> None:
    """The Anthropic SDK's ``tool_choice`` {"type": "tool"} through the front reaches Claude in
    its form; the loopback (which checks it as the API does, and answers a forced choice with a
    call of that tool) answers with a get_weather call, which the SDK reads as its own. Before,
    the front refused every choice but auto (400 "only 'auto'")."""
    front = f"http://{providers.stack.addresses['http-front']}"
    client = anthropic.Anthropic(
        base_url=front, api_key=providers.stack.keys["tenant-a"], max_retries=0
    )
    ask = f"Coat or not? {uuid.uuid4().hex[:8]}"
    answer = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=128,
        tools=_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": ask}],
    )
    assert answer.stop_reason == "tool_use"
    assert [b.type for b in answer.content] == ["tool_use"]  # the call alone, as Claude's
    assert [b.name for b in answer.content if b.type == "tool_use"] == ["get_weather"]
    (sent,) = _sent_with(providers, "anthropic", ask)
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather"}
    choices: list[Any] = [{"type": "none"}, {"type": "auto"}]
    for choice in choices:
        ask = f"Coat or not? {uuid.uuid4().hex[:8]}"
        answer = client.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=128,
            tools=_TOOLS,
            tool_choice=choice,
            messages=[{"role": "user", "content": ask}],
        )
        assert answer.stop_reason == "end_turn"
        (sent,) = _sent_with(providers, "anthropic", ask)
        assert sent.get("tool_choice") == (choice if choice["type"] == "none" else None)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=128,
            tools=_TOOLS,
            tool_choice={"type": "tool", "name": "get_news"},
            messages=[{"role": "user", "content": ask}],
        )
    assert "tool_choice.name: 'get_news' is not the name of one of the request's tools" in str(
        refused.value
    )
    client.close()


@pytest.mark.parametrize(
    ("choice", "sent_as", "called"),
    [
        ("required", "required", "get_weather"),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"type": "function", "function": {"name": "get_time"}},
            "get_time",
        ),
    ],
)
def test_a_forced_tool_choice_reaches_openai_and_its_call_the_sdk(
    providers: ProviderStack, choice: Any, sent_as: Any, called: str
) -> None:
    """The OpenAI SDK's ``tool_choice`` ("required", a named function) through the front
    reaches OpenAI in its own form and the call comes back as the SDK's tool_calls."""
    front = f"http://{providers.stack.addresses['http-front']}/v1"
    client = openai.OpenAI(base_url=front, api_key=providers.stack.keys["tenant-a"], max_retries=0)
    ask = f"What now? {uuid.uuid4().hex[:8]}"
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        max_tokens=64,
        tools=_OPENAI_TOOLS,
        tool_choice=choice,
        messages=[{"role": "user", "content": ask}],
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == [called]  # type: ignore[union-attr]
    (sent,) = _sent_with(providers, "openai", ask)
    assert sent["tool_choice"] == sent_as
    client.close()


def test_the_simulator_answers_a_forced_choice_with_a_call_through_both_fronts(
    providers: ProviderStack,
) -> None:
    """sim-small, forced to call get_time (OpenAI SDK) or any tool (Anthropic SDK), answers
    with the call; tool_choice none is answered in text."""
    front = f"http://{providers.stack.addresses['http-front']}"
    key = providers.stack.keys["tenant-a"]
    gpt = openai.OpenAI(base_url=front + "/v1", api_key=key, max_retries=0)
    ask: Any = [{"role": "user", "content": f"Time? {uuid.uuid4().hex[:8]}"}]
    reply = gpt.chat.completions.create(
        model="sim-small",
        max_tokens=64,
        tools=_OPENAI_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        messages=ask,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_time"]  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"
    claude = anthropic.Anthropic(base_url=front, api_key=key, max_retries=0)
    answer = claude.messages.create(
        model="sim-small",
        max_tokens=64,
        tools=_TOOLS,
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": f"Weather? {uuid.uuid4().hex[:8]}"}],
    )
    assert answer.stop_reason == "tool_use"
    assert [b.name for b in answer.content if b.type == "tool_use"] == ["get_weather"]
    answer = claude.messages.create(
        model="sim-small",
        max_tokens=64,
        tools=_TOOLS,
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": f"Weather? {uuid.uuid4().hex[:8]}"}],
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert not [b for b in answer.content if b.type == "tool_use"]
    gpt.close()
    claude.close()
