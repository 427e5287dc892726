"""The HTTP front on the running stack, driven by the official ``anthropic`` and ``openai``
SDKs unchanged but for ``base_url`` and the key: sync and async, streaming and not."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import anthropic
import openai
import pytest
import urllib3

from cachemesh.demo import workload
from tests import sdk_records
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration


@pytest.fixture
def base(stack: RunningStack) -> str:
    return f"http://{stack.addresses['http-front']}"


@pytest.fixture
def key(stack: RunningStack) -> str:
    return stack.keys["tenant-a"]


def _unique(text: str) -> str:
    return f"{text} (case {uuid.uuid4().hex[:8]})"


def _tools_anthropic() -> list[Any]:
    return [
        {
            "name": tool.name,
            "description": tool.description,
            "input_schema": json.loads(tool.input_schema_json),
        }
        for tool in workload.TOOLS
    ]


def _tools_openai() -> list[Any]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": json.loads(tool.input_schema_json),
            },
        }
        for tool in workload.TOOLS
    ]


def _system(marker: str) -> str:
    return f"Session {marker}.\n\n{workload.SYSTEM_PROMPT}"  # over 1,024 tokens


# --- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_same_question_twice_is_an_l1_hit(base: str, key: str) -> None:
    client = anthropic.Anthropic(base_url=base, api_key=key)
    question = _unique("How do I rotate my API keys?")
    first = client.messages.with_raw_response.create(
        model="sim-small", max_tokens=200, messages=[{"role": "user", "content": question}]
    )
    second = client.messages.with_raw_response.create(
        model="sim-small", max_tokens=200, messages=[{"role": "user", "content": question}]
    )
    assert first.headers["x-cachemesh-served-by"] == "model"
    assert second.headers["x-cachemesh-served-by"] == "semantic-cache"
    assert second.headers["x-cachemesh-similarity"] == "1.0000"
    assert int(second.headers["x-cachemesh-cost-nanos"]) == 0
    assert int(second.headers["x-cachemesh-saved-nanos"]) > 0
    one, two = first.parse(), second.parse()
    assert isinstance(one, anthropic.types.Message)
    assert one.content[0].type == "text" and two.content[0].type == "text"
    assert two.content[0].text == one.content[0].text
    assert two.usage.output_tokens == one.usage.output_tokens > 0


async def test_anthropic_agent_second_turn_reads_the_prefix_cache_streaming(
    base: str, key: str
) -> None:
    client = anthropic.AsyncAnthropic(base_url=base, api_key=key)
    system: list[Any] = [
        {"type": "text", "text": _system(uuid.uuid4().hex), "cache_control": {"type": "ephemeral"}}
    ]
    turns: list[Any] = [{"role": "user", "content": "I need to change my flight to Boston."}]
    async with client.messages.stream(
        model="sim-large", max_tokens=200, system=system, tools=_tools_anthropic(), messages=turns
    ) as stream:
        first = await stream.get_final_message()
    assert (
        first.usage.cache_creation_input_tokens and first.usage.cache_creation_input_tokens > 1024
    )
    assert not first.usage.cache_read_input_tokens
    text = "".join(b.text for b in first.content if b.type == "text")
    turns += [
        {"role": "assistant", "content": text},
        {"role": "user", "content": "Make it the morning flight, please."},
    ]
    async with client.messages.stream(
        model="sim-large", max_tokens=200, system=system, tools=_tools_anthropic(), messages=turns
    ) as stream:
        second = await stream.get_final_message()
        facts = stream.response.headers
    assert second.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    assert facts["x-cachemesh-served-by"] == "prefix-cache"


def test_anthropic_stream_events_come_in_anthropics_order(base: str, key: str) -> None:
    client = anthropic.Anthropic(base_url=base, api_key=key)
    with client.messages.create(
        model="sim-small",
        max_tokens=100,
        stream=True,
        messages=[{"role": "user", "content": _unique("Tell me about caching")}],
    ) as events:
        kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_anthropic_streamed_l1_hit_tells_its_prompt_in_message_start(base: str, key: str) -> None:
    """Anthropic's stream gives the prompt's usage in message_start (and the output in
    message_delta): consumers that read it there count an L1 hit's prompt as a model's."""
    client = anthropic.Anthropic(base_url=base, api_key=key)
    question: list[Any] = [
        {"role": "user", "content": _unique("How do I change my billing address?")}
    ]
    usages = []
    for _ in range(2):
        with client.messages.create(
            model="sim-small", max_tokens=200, stream=True, messages=question
        ) as stream:
            served = stream.response.headers["x-cachemesh-served-by"]
            events = list(stream)
        start = next(e for e in events if e.type == "message_start").message.usage
        delta = next(e for e in events if e.type == "message_delta").usage
        usages.append((served, start.input_tokens, delta.input_tokens))
    (model, at_start, at_end), (hit, hit_start, hit_end) = usages
    assert (model, hit) == ("model", "semantic-cache")
    assert at_end is not None and at_start == at_end > 0
    assert hit_start == hit_end == at_end


def test_anthropic_tool_use_and_tool_result_round_trip(base: str, key: str) -> None:
    client = anthropic.Anthropic(base_url=base, api_key=key)
    reply = client.messages.create(
        model="sim-large",
        max_tokens=200,
        tools=_tools_anthropic(),
        messages=[
            {"role": "user", "content": _unique("What is the status of booking ABC123?")},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look that up."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": workload.TOOLS[0].name,
                        "input": {"reservation_id": "ABC123"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01",
                        "content": [{"type": "text", "text": '{"status": "confirmed"}'}],
                    }
                ],
            },
        ],
    )
    assert reply.stop_reason == "end_turn"
    assert reply.content and reply.content[0].type == "text"


def _file_read_turns(text: str, breakpoint_in_parts: dict[str, Any]) -> list[Any]:
    """An agent's turns: the user's ask, the model's tool call, and a tool result of ``text``
    (over 1,024 tokens) whose one text part carries the breakpoint (valid in the API)."""
    part = {"type": "text", "text": text, "cache_control": breakpoint_in_parts}
    return [
        {"role": "user", "content": "Summarise the support policy file."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "p"}}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [part]}],
        },
    ]


def _claude_past_l1(base: str, key: str) -> anthropic.Anthropic:
    """An Anthropic client whose requests L1 leaves to the model (the prefix cache's test)."""
    return anthropic.Anthropic(
        base_url=base, api_key=key, default_headers={"x-cachemesh-semantic": "bypass"}
    )


def _gpt_past_l1(base: str, key: str) -> openai.OpenAI:
    """An OpenAI client whose requests L1 leaves to the model."""
    return openai.OpenAI(
        base_url=f"{base}/v1", api_key=key, default_headers={"x-cachemesh-semantic": "bypass"}
    )


def _cached_system() -> dict[str, Any]:
    """A fresh system prompt long enough to cache, with a (5-minute) breakpoint on it."""
    return {
        "type": "text",
        "text": _system(uuid.uuid4().hex),
        "cache_control": {"type": "ephemeral"},
    }


def test_anthropic_breakpoint_inside_a_tool_results_content_writes_the_prefix(
    base: str, key: str
) -> None:
    client = _claude_past_l1(base, key)
    tool: Any = {"name": "read_file", "input_schema": {"type": "object"}}
    turns = _file_read_turns(_system(uuid.uuid4().hex), {"type": "ephemeral"})
    first = client.messages.create(model="sim-small", max_tokens=50, tools=[tool], messages=turns)
    written = first.usage.cache_creation_input_tokens
    assert written and written > 1024
    text = "".join(b.text for b in first.content if b.type == "text")
    turns += [{"role": "assistant", "content": text}, {"role": "user", "content": "Shorter?"}]
    second = client.messages.create(model="sim-small", max_tokens=50, tools=[tool], messages=turns)
    assert second.usage.cache_read_input_tokens == written


def test_openai_breakpoint_in_a_tool_messages_parts_is_cached(base: str, key: str) -> None:
    client = _gpt_past_l1(base, key)
    part = _cached_system()
    call: Any = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "read_file", "arguments": "{}"},
    }
    turns: list[Any] = [
        {"role": "user", "content": "Summarise the support policy file."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [part]},
    ]
    tools: Any = [{"type": "function", "function": {"name": "read_file", "parameters": {}}}]
    first = client.chat.completions.create(
        model="sim-small", messages=turns, tools=tools, max_tokens=50
    )
    turns += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Shorter?"},
    ]
    second = client.chat.completions.create(
        model="sim-small", messages=turns, tools=tools, max_tokens=50
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached and cached > 1024


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_usage_splits_the_cache_write_by_ttl(base: str, key: str, stream: bool) -> None:
    """A 1h write costs 2x the input price, a 5m one 1.25x: usage.cache_creation tells them
    apart (Anthropic's CacheCreation), in the body and in a stream's message_delta (the bill).
    A stream's message_start claims none: its counts are an estimate, which message_delta
    corrects in the SDK's final message, all but this split, which the SDK keeps as
    message_start left it (a provider's report moving a write to a read left a 5-minute
    write of 2,000 tokens in the final message beside a bill of 0)."""
    client = _claude_past_l1(base, key)
    system: Any = [
        {
            "type": "text",
            "text": _system(uuid.uuid4().hex),
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    question: Any = {
        "type": "text",
        "text": _unique("Which of my bookings can still be refunded?"),
        "cache_control": {"type": "ephemeral"},
    }
    turns: Any = [{"role": "user", "content": [question]}]
    message: anthropic.types.Message
    if stream:
        with client.messages.stream(
            model="sim-small", max_tokens=30, system=system, messages=turns
        ) as events:
            seen = list(events)
            message = events.get_final_message()
        started = next(e for e in seen if e.type == "message_start").message.usage
        assert started.cache_creation is None and message.usage.cache_creation is None
        delta = next(e for e in seen if e.type == "message_delta").usage
        assert delta.model_extra is not None  # the SDK keeps the field it does not declare
        split = anthropic.types.CacheCreation.model_validate(delta.model_extra["cache_creation"])
    else:
        message = client.messages.create(
            model="sim-small", max_tokens=30, system=system, messages=turns
        )
        assert message.usage.cache_creation is not None
        split = message.usage.cache_creation
    usage = message.usage
    one_hour = split.ephemeral_1h_input_tokens
    five_minutes = split.ephemeral_5m_input_tokens
    assert one_hour > 1024 and five_minutes > 0
    assert one_hour + five_minutes == usage.cache_creation_input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_openai_usage_tells_the_cache_write(base: str, key: str, stream: bool) -> None:
    """A breakpoint's first call pays a cache write (1.25x the input price, over the
    baseline): prompt_tokens_details.cache_write_tokens says how many tokens, in the body
    and in the include_usage chunk; the next call reads them (cached_tokens) and writes none."""
    client = _gpt_past_l1(base, key)
    part = _cached_system()
    turns: list[Any] = [{"role": "system", "content": [part]}]
    details: list[openai.types.completion_usage.PromptTokensDetails] = []
    usage: openai.types.CompletionUsage | None
    for question in ("Cancel my reservation please.", "Which one was it?"):
        turns.append({"role": "user", "content": _unique(question)})
        if stream:
            chunks = client.chat.completions.create(
                model="sim-small",
                messages=turns,
                max_tokens=30,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [c.usage for c in chunks if c.usage is not None][-1]
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="sim-small", messages=turns, max_tokens=30
            )
            usage = raw.parse().usage
            if not details:  # the write is what takes the cost over the baseline
                cost = int(raw.headers["x-cachemesh-cost-nanos"])
                assert cost > int(raw.headers["x-cachemesh-baseline-nanos"])
        assert usage is not None and usage.prompt_tokens_details is not None
        details.append(usage.prompt_tokens_details)
    first, second = details
    assert first.cached_tokens == 0
    assert first.cache_write_tokens is not None and first.cache_write_tokens > 1024
    assert second.cache_write_tokens == 0
    assert second.cached_tokens == first.cache_write_tokens


def test_anthropic_errors_are_the_sdks_own_exceptions(base: str, key: str) -> None:
    question: list[Any] = [{"role": "user", "content": "hello"}]
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic.Anthropic(base_url=base, api_key="cm_not-a-key").messages.create(
            model="sim-small", max_tokens=10, messages=question
        )
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = anthropic.Anthropic(base_url=base, api_key=key)
    # an unknown model is 404, as Anthropic answers it: an `except NotFoundError` fallback fires
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=10, messages=question)
    assert "model" in missing.value.message
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as extra:
        client.messages.create(
            model="sim-small", max_tokens=10, messages=question, extra_body={"colour": "red"}
        )
    assert "colour" in extra.value.message
    with pytest.raises(anthropic.APIStatusError) as large:
        client.messages.create(
            model="sim-small",
            max_tokens=10,
            messages=[{"role": "user", "content": "x" * 2_200_000}],
        )
    assert large.value.status_code == 413


# --- OpenAI ------------------------------------------------------------------------------------


def test_openai_same_question_twice_is_an_l1_hit(base: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
    question = _unique("What are your support hours?")
    asks = [{"role": "user", "content": question}]
    first = client.chat.completions.with_raw_response.create(model="sim-small", messages=asks)  # type: ignore[arg-type]
    second = client.chat.completions.with_raw_response.create(model="sim-small", messages=asks)  # type: ignore[arg-type]
    assert first.headers["x-cachemesh-served-by"] == "model"
    assert second.headers["x-cachemesh-served-by"] == "semantic-cache"
    one, two = first.parse(), second.parse()
    assert two.choices[0].message.content == one.choices[0].message.content
    assert one.choices[0].finish_reason == "stop"
    assert one.usage is not None and one.usage.completion_tokens > 0


async def test_openai_agent_streaming_with_usage_reads_the_prefix_cache(
    base: str, key: str
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key)
    system = {
        "role": "system",
        "content": [
            {
                "type": "text",
                "text": _system(uuid.uuid4().hex),
                "cache_control": {"type": "ephemeral"},
            }
        ],
    }
    turns: list[Any] = [system, {"role": "user", "content": "Cancel my reservation please."}]
    usages = []
    for follow_up in ("Yes, the one to Denver.", None):
        stream = await client.chat.completions.create(
            model="sim-large", messages=turns, stream=True, stream_options={"include_usage": True}
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text and usage is not None
        usages.append(usage)
        if follow_up:
            turns += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": follow_up},
            ]
    first, second = usages
    assert first.prompt_tokens_details is not None and second.prompt_tokens_details is not None
    assert first.prompt_tokens_details.cached_tokens == 0
    assert (
        second.prompt_tokens_details.cached_tokens
        and second.prompt_tokens_details.cached_tokens > 1024
    )
    assert second.prompt_tokens > second.prompt_tokens_details.cached_tokens


def test_openai_tool_calls_round_trip(base: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
    tools = _tools_openai()
    reply = client.chat.completions.create(
        model="sim-large",
        tools=tools,
        messages=[
            {"role": "user", "content": _unique("Where is booking XYZ?")},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": workload.TOOLS[0].name,
                            "arguments": '{"reservation_id": "XYZ"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "boarding"}'},
        ],
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


def test_openai_temperature_above_one_is_openais_range(base: str, key: str) -> None:
    """OpenAI's temperature range is [0, 2]; the simulated models take it (an Anthropic model
    refuses above 1, naming its range: test_http_front_provider_tools)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    asks: list[Any] = [{"role": "user", "content": _unique("Say hi")}]
    for temperature in (1.2, 2.0):
        reply = client.chat.completions.create(
            model="sim-small", temperature=temperature, max_tokens=10, messages=asks
        )
        assert reply.choices[0].finish_reason in ("stop", "length")


async def test_openai_errors_are_the_sdks_own_exceptions(base: str, key: str) -> None:
    asks: list[Any] = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="cm_wrong").chat.completions.create(
            model="sim-small", messages=asks
        )
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key)
    with pytest.raises(openai.NotFoundError) as missing:  # as OpenAI answers an unknown model
        await client.chat.completions.create(model="gpt-17", messages=asks)
    assert missing.value.code == "model_not_found" and "gpt-17" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="sim-small", messages=asks, n=2)
    assert "n" in bad.value.message
    with pytest.raises(openai.BadRequestError) as wrong:
        await client.chat.completions.create(model="sim-small", messages="hello")  # type: ignore[arg-type]
    assert "messages" in wrong.value.message


# --- plain HTTP: models, health, traces -------------------------------------------------------


def test_models_in_each_apis_shape(base: str, key: str) -> None:
    listed = anthropic.Anthropic(base_url=base, api_key=key).models.list()
    assert {m.id for m in listed.data} >= {"auto", "sim-small", "sim-large"}
    models = openai.OpenAI(base_url=f"{base}/v1", api_key=key).models.list()
    assert {m.id for m in models.data} >= {"auto", "sim-small", "sim-large"}
    assert all(m.object == "model" for m in models.data)


def test_health_readiness_and_an_incoming_traceparent_joins_the_trace(
    base: str, key: str, stack: RunningStack
) -> None:
    http = urllib3.PoolManager()
    assert http.request("GET", f"{base}/healthz").status == 200
    assert http.request("GET", f"{base}/readyz").status == 200
    trace_id = uuid.uuid4().hex
    reply = http.request(
        "POST",
        f"{base}/v1/messages",
        body=json.dumps(
            {
                "model": "sim-small",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": _unique("hi")}],
            }
        ),
        headers={
            "x-api-key": key,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
            "traceparent": f"00-{trace_id}-{'1' * 16}-01",
            "x-cachemesh-namespace": "traces",
        },
    )
    assert reply.status == 200, reply.data
    assert reply.headers["x-cachemesh-trace-id"] == trace_id
    assert reply.headers["traceparent"].startswith(f"00-{trace_id}-")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = stack.sink.spans_of(trace_id)
        if {"http-front", "router"} <= {s.service for s in spans}:
            break
        time.sleep(0.2)
    front = [s for s in spans if s.service == "http-front"]
    router = [s for s in spans if s.service == "router" and s.kind == 2]  # SERVER
    assert front and front[0].parent_span_id == "1" * 16  # the caller's span
    assert router and router[0].parent_span_id == front[0].span_id


@pytest.mark.parametrize(
    "empty",
    [
        pytest.param({"content": ""}, id="the front's own empty answer"),
        pytest.param({"content": [{"type": "text", "text": ""}]}, id="an empty text part"),
        pytest.param({"content": []}, id="no parts"),
    ],
)
def test_openai_history_with_an_empty_answer_is_taken(base: str, key: str, empty: Any) -> None:
    """An application sends back the history it got: an answer the model left empty comes back
    as an assistant message with no text, which OpenAI takes; it was a 400."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
    messages: list[Any] = [
        {"role": "user", "content": _unique("Say nothing.")},
        {"role": "assistant", **empty},
        {"role": "user", "content": "Now tell me about caching."},
    ]
    reply = client.chat.completions.create(model="sim-small", messages=messages)
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param({}, id="no content"),
        pytest.param({"content": "ok", "tool_calls": []}, id="tool_calls empty"),
    ],
)
def test_openai_history_openai_refuses_is_refused_naming_the_field(
    base: str, key: str, shape: Any
) -> None:
    """An assistant message with no content and no tool calls, or with ``tool_calls: []``:
    OpenAI's 400s (tests/providers/openai_wire.py), which the front took, so a history it
    took was one the same application sending it to OpenAI got refused. (``content: null``
    OpenAI refuses too, but the front takes it: the next test.)"""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    messages: list[Any] = [
        {"role": "user", "content": _unique("Say nothing.")},
        {"role": "assistant", **shape},
        {"role": "user", "content": "Now tell me about caching."},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="sim-small", messages=messages)
    field = "tool_calls" if "tool_calls" in shape else "content"
    assert refused.value.param == f"messages[1].{field}"
    assert "OpenAI refuses it too" in str(refused.value.body)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(r[3], id=sdk_records.record_id(r))
        for r in sdk_records.OPENAI_NODE_EMPTY_ANSWERS
    ],
)
def test_openai_history_with_the_node_sdks_empty_answer_is_taken(
    base: str, key: str, answer: dict[str, Any]
) -> None:
    """The official Node SDK's message of the front's streamed empty answer holds
    ``content: null`` (recorded with the real SDK: tests/sdk_records.py): a client replaying
    its own history sends it, and the front took it, then refused it (a 400 naming
    ``messages[1].content``), though it returned it."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    messages: list[Any] = [
        {"role": "user", "content": _unique("Say nothing.")},
        answer,
        {"role": "user", "content": "Now tell me about caching."},
    ]
    reply = client.chat.completions.create(model="sim-small", messages=messages)
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


def test_openai_empty_answer_with_tool_calls_keeps_its_calls(base: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
    tools = _tools_openai()
    call: Any = {
        "id": "call_1",
        "type": "function",
        "function": {"name": workload.TOOLS[0].name, "arguments": '{"reservation_id": "XYZ"}'},
    }
    reply = client.chat.completions.create(
        model="sim-large",
        tools=tools,
        messages=[
            {"role": "user", "content": _unique("Where is booking XYZ?")},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "boarding"}'},
        ],
    )
    assert reply.choices[0].message.content
    # the call is still there: its result without it is refused, naming the result
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="sim-large",
            tools=tools,
            messages=[
                {"role": "user", "content": _unique("Where is booking XYZ?")},
                {"role": "assistant", "content": ""},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "boarding"}'},
            ],
        )
    assert "messages[2]" in str(refused.value)


def test_openai_history_with_a_refused_answer_shows_the_model_its_refusal(
    base: str, key: str
) -> None:
    """An answer OpenAI's model refused has its words in ``refusal``; sent back, it was
    dropped as an empty answer (the same prompt as with no answer at all): the refusal is the
    assistant's text, so the prompt holds it, sent back as OpenAI takes it (a refusal part,
    or content beside the refusal) or as the SDK returned it (``content: null``, which
    OpenAI's reference does not take and the front does: ``openai_api._answer_shape``)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
    question = _unique("Help me with this.")

    def prompt_tokens(answer: dict[str, Any]) -> int:
        messages: list[Any] = [
            {"role": "user", "content": question},
            {"role": "assistant", **answer},
            {"role": "user", "content": "Why not?"},
        ]
        reply = client.chat.completions.create(model="sim-small", messages=messages)
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    empty = prompt_tokens({"content": ""})  # (null without a refusal: the same empty answer)
    words = "I can't help with that request."
    refused = prompt_tokens({"content": [{"type": "refusal", "refusal": words}]})
    assert refused > empty
    assert prompt_tokens({"content": "", "refusal": words}) == refused
    assert prompt_tokens({"content": None, "refusal": words}) == refused


@pytest.mark.parametrize(
    "content",
    [
        pytest.param([], id="no block"),
        pytest.param([{"type": "text", "text": ""}], id="an empty text block"),
        pytest.param([{"type": "text", "text": " "}], id="a whitespace-only runaway"),
    ],
)
def test_anthropic_empty_answer_is_taken_last_and_before_the_last(
    base: str, key: str, content: Any
) -> None:
    """The front's own empty answers, as the SDKs hold them (``content: []``; the text block
    ``" "`` of a whitespace-only runaway), sent back: the API takes the last one (no prefill)
    and refuses one anywhere else; the front refused each before the last (the Gateway's "a
    message needs at least one block" / "text blocks must not be empty") and the first two
    last too. Now each is no Gateway turn, and a Gateway refusal of a later message names the
    caller's index of it, not the Gateway's."""
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    question: Any = {"role": "user", "content": _unique("Tell me about caching.")}
    empty: Any = {"role": "assistant", "content": content}
    more: Any = {"role": "user", "content": "And about routing?"}
    reply = client.messages.create(model="sim-small", max_tokens=50, messages=[question, empty])
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens")
    reply = client.messages.create(
        model="sim-small", max_tokens=50, messages=[question, empty, more]
    )
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens")
    # the Gateway's messages[2] (its 3rd: the empty answer is none, and the user messages
    # around it one turn, as the API combines them) is the caller's 5th
    bad: Any = {
        "role": "user",
        "content": [{"type": "text", "text": "x"}, {"type": "text", "text": ""}],
    }
    answered: Any = {"role": "assistant", "content": "Caching keeps prefixes."}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(
            model="sim-small", max_tokens=50, messages=[question, empty, more, answered, bad]
        )
    said = str(refused.value.body)
    assert re.search(r"messages\.4\.content\.1\b", said), said  # the caller's 5th, dotted
    assert "text blocks must not be empty" in said
    # the user messages around the empty answer are one turn, as the API combines them: the
    # prompt is the one turn's (before: two user turns, a prompt of its own)
    bypass = {"x-cachemesh-semantic": "bypass"}
    apart = client.messages.create(
        model="sim-small", max_tokens=50, messages=[question, empty, more], extra_headers=bypass
    )
    parts: Any = [{"type": "text", "text": m["content"]} for m in (question, more)]
    joined = client.messages.create(
        model="sim-small",
        max_tokens=50,
        messages=[{"role": "user", "content": parts}],
        extra_headers=bypass,
    )

    def prompt(usage: Any) -> int:  # the whole prompt's, read from a cache or not
        return int(
            usage.input_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )

    assert prompt(apart.usage) == prompt(joined.usage)


# a field path as Chat Completions writes one (``messages[1]``, ``content[0]``)
_BRACKET_PATH = r"\b(?:messages|system|tools|content)\[\d+\]"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_gateway_refusals_name_fields_as_the_messages_api_does(
    base: str, key: str, stream: bool
) -> None:
    """A Gateway refusal passed on to the Messages API names its fields in that API's form
    (``messages.1.content.0.tool_use.name``, as Anthropic's own 400s do), not the Gateway's
    and Chat Completions' ``messages[1].content[0]``; the rest of its words, a quoted value
    that looks like a path included, as the Gateway said them."""
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    messages: Any = [
        {"role": "user", "content": _unique("Look it up.")},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "messages[0]", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
    ]
    with pytest.raises(anthropic.BadRequestError) as refused:
        if stream:
            with client.messages.stream(
                model="sim-small", max_tokens=50, messages=messages
            ) as events:
                events.get_final_message()
        else:
            client.messages.create(model="sim-small", max_tokens=50, messages=messages)
    body = refused.value.body
    assert isinstance(body, dict)
    said = body["error"]["message"]
    assert said.startswith(
        "messages.1.content.0.tool_use.name: 'messages[0]' is not a declared tool;"
    ), said
    assert not re.search(_BRACKET_PATH, said.replace("'messages[0]'", "")), said
    # the Gateway's role (its enum's ROLE_USER) in the API's words
    first: Any = [{"role": "assistant", "content": "Hello."}, messages[0]]
    with pytest.raises(anthropic.BadRequestError) as refused:
        if stream:
            with client.messages.stream(model="sim-small", max_tokens=50, messages=first) as ev:
                ev.get_final_message()
        else:
            client.messages.create(model="sim-small", max_tokens=50, messages=first)
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["error"]["message"] == (
        'messages.0.role: the first message must be the user\'s ("role": "user")'
    )
