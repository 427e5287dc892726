"""The HTTP front's translation between each API's JSON and the Gateway's messages (no I/O)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import anthropic.types
import grpc
import openai
import pydantic
import pytest
from google.rpc import status_pb2
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from cachemesh.retry_info import (
    BUDGET_EXHAUSTED,
    CONTEXT_WINDOW,
    RATE_LIMITED,
    REQUEST_TOO_LARGE,
    STATUS_DETAILS_KEY,
    UNSUPPORTED_VALUE,
)
from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.retry_info import error_info, refusal_trailers
from services.http_front import anthropic_api, openai_api
from services.http_front.errors import ApiError, from_gateway
from services.http_front.facts import cache_options
from services.http_front.fields import parse_body
from services.http_front.gateway import api_error
from services.router.validation import validate_request
from tests import sdk_records
from tests.providers import anthropic_wire, openai_wire


def _anthropic(**fields: Any) -> dict[str, Any]:
    return {
        "model": "sim-small",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }


def test_anthropic_blocks_tools_and_breakpoints_map_one_to_one() -> None:
    request, stream = anthropic_api.parse_request(
        _anthropic(
            stream=True,
            temperature=0,
            system=[
                {"type": "text", "text": "sys", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
            ],
            tools=[
                {
                    "name": "get",
                    "input_schema": {"type": "object"},
                    "cache_control": {"type": "ephemeral"},
                }
            ],
            messages=[
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"a": 1}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "r"}],
                        }
                    ],
                },
            ],
        ),
        version="2023-06-01",  # a version that takes temperature
    )
    assert stream
    assert request.HasField("temperature") and request.temperature == 0.0
    assert request.system[0].cache_control.ttl == pb.CACHE_TTL_1H
    assert request.tools[0].HasField("cache_control")
    assert request.tools[0].cache_control.ttl == pb.CACHE_TTL_UNSPECIFIED
    assert json.loads(request.messages[1].content[0].tool_use.input_json) == {"a": 1}
    assert request.messages[2].content[0].tool_result.content == "r"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (_anthropic(colour="red"), "colour"),
        (_anthropic(max_tokens="10"), "max_tokens: expected an integer, got string"),
        ({"model": "m", "messages": []}, "max_tokens: Field required"),
        (_anthropic(messages=[{"role": "system", "content": "x"}]), "messages.0.role"),
        (
            _anthropic(messages=[{"role": "user", "content": [{"type": "image"}]}]),
            "messages.0.content.0.type",
        ),
        (_anthropic(stop_sequences=["\n"]), "stop_sequences"),
        (_anthropic(tool_choice={"type": "any"}), "tool_choice"),
        (
            _anthropic(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "text",
                                "text": "x",
                                "cache_control": {"type": "ephemeral", "ttl": "2h"},
                            }
                        ],
                    }
                ]
            ),
            "messages.0.content.0.cache_control.ttl",
        ),
    ],
)
def test_anthropic_bad_input_names_the_field(body: dict[str, Any], names: str) -> None:
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(body)
    assert refused.value.kind == "invalid_request"
    assert names in refused.value.message


THINKERS = frozenset({"claude-sonnet-5", "auto"})  # as settings.py marks them


@pytest.mark.parametrize(
    ("thinking", "model", "names"),
    [
        ({"type": "enabled", "budget_tokens": 2048}, "sim-small", "thinking: extended"),
        ({"type": "adaptive"}, "claude-sonnet-5", "thinking: extended"),
        ({}, "sim-small", "thinking.type: Field required"),
        # the Gateway has no thinking field: dropped, the model thought (and billed) anyway
        ({"type": "disabled"}, "claude-sonnet-5", "thinking.type: 'disabled' is not supported"),
        ({"type": "disabled"}, "auto", "for auto, which may pick a model that thinks by default"),
    ],
)
def test_anthropic_thinking_the_gateway_cannot_honour_is_refused(
    thinking: dict[str, Any], model: str, names: str
) -> None:
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(
            _anthropic(model=model, thinking=thinking), thinks_by_default=THINKERS
        )
    assert refused.value.kind == "invalid_request"
    assert names in refused.value.message


def test_anthropic_thinking_disabled_is_served_where_it_is_the_models_default() -> None:
    """Nothing is dropped: a model that thinks only when asked does not think."""
    for model in ("sim-small", "claude-haiku-4-5"):
        request, _ = anthropic_api.parse_request(
            _anthropic(model=model, thinking={"type": "disabled"}), thinks_by_default=THINKERS
        )
        assert request.model == model


@pytest.mark.parametrize(
    ("raw", "says"),
    [(b"{", "not valid JSON"), (b"[1]", "must be a JSON object, got array"), (b"\xff", "UTF-8")],
)
def test_a_body_that_is_not_a_json_object_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_body(raw, "anthropic")
    assert says in refused.value.message


def test_openai_roles_tool_calls_and_tool_messages() -> None:
    request, stream, include_usage = openai_api.parse_request(
        {
            "model": "sim-large",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "a"},
                {
                    "role": "developer",
                    "content": [
                        {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}
                    ],
                },
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x": 2}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "out"},
                {"role": "user", "content": "and then?"},
            ],
        },
        default_max_tokens=77,
    )
    assert stream and include_usage
    assert request.max_tokens == 77
    assert [b.text for b in request.system] == ["a", "b"]
    assert request.system[1].HasField("cache_control")
    assert [m.role for m in request.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert request.messages[1].content[0].tool_use.name == "f"
    result, follow = request.messages[2].content
    assert result.tool_result.tool_use_id == "c1" and follow.text == "and then?"


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"n": 2}, "n:"),
        ({"stop": ["x"]}, "stop"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logit": 1}, "logit"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_openai_bad_input_names_the_field(fields: dict[str, Any], names: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(body, 10)
    assert names in refused.value.message
    assert refused.value.body_for("openai", "r")["error"]["type"] == "invalid_request_error"


def _end(*blocks: pb.ContentBlock, stop: str = "end_turn") -> pb.CompleteResponse:
    return pb.CompleteResponse(
        content=blocks,
        served_by=pb.LAYER_PREFIX_CACHE,
        model="sim-large",
        stop_reason=stop,
        request_id="r1",
        usage=pb.Usage(
            input_tokens=5,
            cache_creation_input_tokens=7,
            cache_read_input_tokens=11,
            output_tokens=3,
            cache_creation=pb.CacheCreation(
                ephemeral_5m_input_tokens=2, ephemeral_1h_input_tokens=5
            ),
        ),
    )


def test_usage_is_each_apis_own() -> None:
    end = _end(pb.ContentBlock(text="a"))
    assert anthropic_api.response(end)["usage"] == {
        "input_tokens": 5,
        "cache_creation_input_tokens": 7,
        "cache_read_input_tokens": 11,
        "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 5},
        "output_tokens": 3,
    }
    usage = openai_api.response(end, 0)["usage"]
    assert usage["prompt_tokens"] == 23 and usage["completion_tokens"] == 3
    assert usage["prompt_tokens_details"]["cached_tokens"] == 11
    assert usage["prompt_tokens_details"]["cache_write_tokens"] == 7
    end.usage.reasoning_tokens = 2  # of the 3 output tokens, the model's thinking
    thinking = openai_api.response(end, 0)["usage"]["completion_tokens_details"]
    assert thinking["reasoning_tokens"] == 2


def test_anthropic_stream_events_for_text_then_a_tool_use() -> None:
    stream = anthropic_api.EventStream()
    use = pb.ToolUse(id="t", name="f", input_json='{"k":1}')
    events = [
        *stream.start(pb.CompleteResponse(request_id="r1", model="m")),
        *stream.delta(pb.ContentBlock(text="a")),
        *stream.delta(pb.ContentBlock(text="b")),
        *stream.delta(pb.ContentBlock(tool_use=use)),
        *stream.end(_end(stop="tool_use"), {}),
    ]
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert [body.get("index") for _, body in events[1:8]] == [0, 0, 0, 0, 1, 1, 1]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_openai_chunks_end_with_the_finish_reason_then_the_usage() -> None:
    chunks = openai_api.ChunkStream(created=1, include_usage=True)
    use = pb.ToolUse(id="c", name="f", input_json="{}")
    out = [
        *chunks.start(pb.CompleteResponse(request_id="r1", model="m")),
        *chunks.delta(pb.ContentBlock(tool_use=use)),
        *chunks.end(_end(stop="tool_use"), {}),
    ]
    # the role at the start with no content (OpenAI's first chunk of a call's answer)
    first = out[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None, "refusal": None}
    assert out[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
    assert out[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[3]["choices"] == [] and out[3]["usage"]["total_tokens"] == 26
    assert all(c["usage"] is None for c in out[:3])


def test_openai_chunks_of_an_answer_with_no_block_still_say_the_role() -> None:
    chunks = openai_api.ChunkStream(created=1, include_usage=False)
    out = [
        *chunks.start(pb.CompleteResponse(request_id="r1", model="m")),
        *chunks.end(_end(), {}),
    ]
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": None, "refusal": None},
        {"content": ""},  # the answer's content, as the unstreamed one says it
        {},
    ]


def _openai_stream(
    blocks: Iterable[pb.ContentBlock], end: pb.CompleteResponse
) -> list[dict[str, Any]]:
    """The chunks the front streams for an answer of ``blocks`` ending with ``end``, as an SDK
    reads them (the ``cachemesh`` facts field left out)."""
    stream = openai_api.ChunkStream(created=1, include_usage=False)
    sent = [
        *stream.start(pb.CompleteResponse(request_id="r1", model="sim-small")),
        *[c for block in blocks for c in stream.delta(block)],
        *stream.end(end, {}),
    ]
    return [{k: v for k, v in chunk.items() if k != "cachemesh"} for chunk in sent]


@pytest.mark.parametrize(
    ("blocks", "content"),
    [
        ([], ""),  # an empty answer: "" as unstreamed, not the role chunk's null
        ([pb.ContentBlock(text="Hi")], "Hi"),
        ([pb.ContentBlock(tool_use=pb.ToolUse(id="c", name="f", input_json="{}"))], None),
    ],
)
def test_the_sdks_message_of_a_streamed_answer_is_one_it_can_send_back(
    blocks: list[pb.ContentBlock], content: str | None
) -> None:
    """The official SDK's stream helper (ChatCompletionStreamState) reads the front's chunks
    into the answer's message as the unstreamed answer says it. An empty answer's was
    ``content: None`` (the role chunk's, nothing after it), which OpenAI refuses in a history
    sent back (the front takes it since: the Node SDK's helper builds it still)."""
    stop = "tool_use" if content is None else "end_turn"
    state = ChatCompletionStreamState()
    for chunk in _openai_stream(blocks, _end(stop=stop)):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    assert message.content == content
    sent_back = message.model_dump(exclude={"parsed"})
    if sent_back["tool_calls"]:
        sent_back["tool_calls"] = [
            {k: v for k, v in call.items() if k != "parsed_arguments"}
            for call in sent_back["tool_calls"]
        ]
    answered = [{"role": "tool", "tool_call_id": "c", "content": "42"}] if content is None else []
    body: dict[str, Any] = {"model": "sim-small", "messages": [_Q, sent_back, *answered, _MORE]}
    openai_api.parse_request(body, 10)  # taken
    assert openai_wire.refusal({}, body | {"model": "gpt-4o"}) is None  # and OpenAI takes it


@pytest.mark.parametrize(
    ("code", "message", "retry", "anthropic_status", "openai_status"),
    [
        (Code.INVALID_ARGUMENT, "model: unknown", None, 400, 400),
        (Code.UNAUTHENTICATED, "unknown API key", None, 401, 401),
        (Code.RESOURCE_EXHAUSTED, "request larger than the limit", None, 413, 413),
        (Code.RESOURCE_EXHAUSTED, "prompt over the context window", None, 400, 400),
        (Code.RESOURCE_EXHAUSTED, "rate limit", 3, 429, 429),
        (Code.RESOURCE_EXHAUSTED, "day budget", 6400, 429, 429),
        (Code.UNAVAILABLE, "no layer can serve", None, 529, 503),
        # every replica's provider rate limited past the call's deadline: its retry-after
        # goes on (before: none, and the SDKs retried at once), a wait past 60 s as final
        (Code.UNAVAILABLE, "no model replica could serve the request", 30, 529, 503),
        (Code.UNAVAILABLE, "no model replica could serve the request", 600, 529, 503),
        (Code.DEADLINE_EXCEEDED, "slow", None, 504, 504),
        (Code.INTERNAL, "boom", None, 500, 500),
    ],
)
def test_gateway_status_to_http(
    code: Code, message: str, retry: int | None, anthropic_status: int, openai_status: int
) -> None:
    error = from_gateway(code, message, retry)
    assert error.status_for("anthropic") == anthropic_status
    assert error.status_for("openai") == openai_status
    assert message in error.message
    headers = error.headers()
    assert headers.get("retry-after") == (str(retry) if retry else None)
    # a refusal a retry would repeat says so; 429, 529/503 and 500 leave the SDKs to retry
    final = anthropic_status in (400, 401, 413, 504) or (retry or 0) > 60  # a spent budget
    assert headers.get("x-should-retry") == ("false" if final else None)


def test_request_headers_choose_the_cache_options() -> None:
    request = pb.CompleteRequest()
    cache_options(
        {
            "x-cachemesh-semantic": "no-store",
            "x-cachemesh-namespace": "faq",
            "x-cachemesh-threshold": "0",
        },
        request,
    )
    assert request.cache.semantic == pb.SEMANTIC_MODE_NO_STORE
    assert request.cache.namespace == "faq"
    assert request.cache.HasField("threshold") and request.cache.threshold == 0.0
    for bad in ({"x-cachemesh-semantic": "sometimes"}, {"x-cachemesh-threshold": "1.5"}):
        with pytest.raises(ApiError):
            cache_options(bad, pb.CompleteRequest())


def _with_tool_use(**extra: Any) -> dict[str, Any]:
    use = {"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {}, **extra}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "4"}
    return _anthropic(
        tools=[{"name": "calc", "input_schema": {"type": "object"}}],
        messages=[
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [result]},
        ],
    )


def test_a_tool_use_block_passed_back_as_the_sdk_dumps_it_is_accepted() -> None:
    request, _ = anthropic_api.parse_request(_with_tool_use(caller=None, toolset_name=None))
    assert request.messages[1].content[0].tool_use.name == "calc"


def test_a_programmatic_tool_call_is_refused_naming_the_field() -> None:
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(_with_tool_use(caller={"type": "code_execution"}))
    assert "messages.1.content.0.caller" in refused.value.message


@pytest.mark.parametrize(
    ("stop", "anthropic", "openai"),
    [
        ("end_turn", "end_turn", "stop"),
        ("max_tokens", "max_tokens", "length"),
        ("tool_use", "tool_use", "tool_calls"),
        ("refusal", "refusal", "content_filter"),  # an app must see a safety refusal
    ],
)
def test_stop_reasons_reach_each_api_in_its_own_words(
    stop: str, anthropic: str, openai: str
) -> None:
    assert anthropic_api.stop_reason(stop) == anthropic
    assert openai_api.finish_reason(stop) == openai


def _history(assistant: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "sim-large",
        "messages": [
            {"role": "user", "content": "q"},
            assistant,
            {"role": "tool", "tool_call_id": "c1", "content": "out"},
        ],
    }


# an answer's message as the SDK hands it back when an application appends it to its history
# (``messages.append(completion.choices[0].message)``); the stream helper's adds parsed and the
# calls' index and parsed_arguments, OpenAI's own answers annotations
_ECHOED = {
    "role": "assistant",
    "content": None,
    "refusal": None,
    "annotations": [],
    "audio": None,
    "function_call": None,
    "parsed": None,
    "tool_calls": [
        {
            "index": 0,
            "id": "c1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"x": 2}', "parsed_arguments": {"x": 2}},
        }
    ],
}


def test_an_answers_message_sent_back_as_the_sdk_returned_it_is_the_same_turn() -> None:
    plain = {k: v for k, v in _ECHOED.items() if k in ("role", "content", "tool_calls")}
    plain["tool_calls"] = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}
    ]
    echoed, _, _ = openai_api.parse_request(_history(_ECHOED), 10)
    written, _, _ = openai_api.parse_request(_history(plain), 10)
    assert echoed == written
    assert echoed.messages[1].content[0].tool_use.input_json == '{"x":2}'


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"audio": {"id": "audio_1"}}, "messages[1].audio: audio answers are not supported"),
        (
            {"function_call": {"name": "f", "arguments": "{}"}},
            "messages[1].function_call: the deprecated function_call is not supported",
        ),
        ({"annotations": "none"}, "messages[1].annotations: expected an array"),
    ],
)
def test_answer_fields_cachemesh_cannot_honour_are_refused_naming_them(
    fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(_history({**_ECHOED, **fields}), 10)
    assert refused.value.kind == "invalid_request" and says in refused.value.message


_LONE = '{"model": "m", "messages": [{"role": "user", "content": "smile \\ud83d"}]}'


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (_LONE.encode("utf-16"), "not UTF-8"),  # json.loads would read these as JSON
        (_LONE.encode("utf-16-le"), "not UTF-8"),
        (_LONE.encode("utf-32"), "not UTF-8"),
        (_LONE.encode("utf-32-be"), "not UTF-8"),
        (_LONE.encode(), "lone UTF-16 surrogate"),
    ],
)
def test_a_body_that_is_not_utf8_text_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_body(raw, "anthropic")
    assert refused.value.kind == "invalid_request" and says in refused.value.message


@pytest.mark.parametrize(
    ("number", "says"),
    [
        ("NaN", "NaN is not a JSON number"),
        ("Infinity", "Infinity is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ("1e999", "'1e999' is beyond the range of a double"),
    ],
)
def test_numbers_json_has_not_are_refused_before_the_gateway(number: str, says: str) -> None:
    """Python's json reads them; the providers' SDKs cannot send them (it was a 529 / 503)."""
    schema = '{"model": "m", "tools": [{"name": "f", "input_schema": {"maximum": ' + number
    with pytest.raises(ApiError) as refused:
        parse_body((schema + "}}]}").encode(), "anthropic")
    assert refused.value.kind == "invalid_request"
    assert refused.value.message.startswith(f"the request body is not valid JSON: {says}")
    arguments = '{"n": ' + number + "}"
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(_history({"role": "assistant", "tool_calls": [call]}), 10)
    where = "messages[1].tool_calls[0].function.arguments"
    assert refused.value.message.startswith(f"{where}: not valid JSON: {says}")
    assert parse_body(b'{"t": 1e308, "n": -0.5}', "openai") == {"t": 1e308, "n": -0.5}


def test_a_body_with_a_utf8_byte_order_mark_is_still_read() -> None:
    assert parse_body(b"\xef\xbb\xbf" + _LONE.replace("\\ud83d", "hi").encode(), "anthropic") == {
        "model": "m",
        "messages": [{"role": "user", "content": "smile hi"}],
    }


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ("[" * 100_000 + "]" * 100_000, "messages[1].tool_calls[0].function.arguments: nested"),
        ('{"text": "smile \\ud83d"}', "messages[1].tool_calls[0].function.arguments: holds a lone"),
    ],
)
def test_tool_call_arguments_the_gateway_cannot_hold_are_refused_naming_them(
    arguments: str, says: str
) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(_history({"role": "assistant", "tool_calls": [call]}), 10)
    assert refused.value.kind == "invalid_request" and says in refused.value.message


def _tool_results(*results: dict[str, Any]) -> list[dict[str, Any]]:
    use = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    return [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": list(results)},
    ]


def test_a_breakpoint_inside_a_tool_results_parts_marks_the_tool_result() -> None:
    """The Gateway's tool result is one text: a ``cache_control`` on its last part (valid in
    both APIs) becomes the tool result's own breakpoint, not lost."""
    five, hour = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}
    parts = [
        {"type": "text", "text": "a", "cache_control": five},
        {"type": "text", "text": "b", "cache_control": hour},
    ]
    request, _ = anthropic_api.parse_request(
        _anthropic(
            messages=_tool_results(
                {"type": "tool_result", "tool_use_id": "t1", "content": parts[:1]},
                {
                    "type": "tool_result",
                    "tool_use_id": "t2",
                    "content": [{"type": "text", "text": "a"}, parts[1]],
                },
                {"type": "tool_result", "tool_use_id": "t3", "content": "plain"},
            )
        )
    )
    first, last, plain = request.messages[2].content
    assert first.HasField("cache_control") and first.cache_control.ttl == pb.CACHE_TTL_UNSPECIFIED
    assert last.cache_control.ttl == pb.CACHE_TTL_1H and last.tool_result.content == "a\nb"
    assert not plain.HasField("cache_control")
    request, _, _ = openai_api.parse_request(
        {
            "model": "sim-small",
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": parts},
            ],
        },
        100,
    )
    (result,) = request.messages[2].content
    assert result.cache_control.ttl == pb.CACHE_TTL_1H and result.tool_result.content == "ab"


@pytest.mark.parametrize("marks", [(0,), (0, 1)])
def test_a_breakpoint_on_a_tool_results_part_before_its_last_is_refused(
    marks: tuple[int, ...],
) -> None:
    """Anthropic caches the prefix through a marked part, and counts each marked part as a
    breakpoint; the Gateway holds a tool result as one text, so such a breakpoint was moved to
    the end of the result (writing the parts after it) and several counted as one."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": t} for t in ("doc", "tail")]
    for i in marks:
        parts[i]["cache_control"] = {"type": "ephemeral"}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": parts}
    with pytest.raises(ApiError) as raised:
        anthropic_api.parse_request(_anthropic(messages=_tool_results(result)))
    error = raised.value
    assert error.kind == "invalid_request" and error.param == "messages.2.content.0.content.0"
    assert "messages.2.content.0.content.0.cache_control" in error.message
    assert "last part" in error.message


def test_the_messages_api_takes_anthropics_temperature_range_the_chat_api_openais() -> None:
    """Anthropic's Messages API refuses a temperature above 1, OpenAI's takes up to 2: each
    front keeps its API's range (the Gateway then checks the target model's)."""
    with pytest.raises(ApiError) as info:
        anthropic_api.parse_request(_anthropic(temperature=1.5), version="2023-06-01")
    assert info.value.kind == "invalid_request" and "temperature" in info.value.message
    assert "[0, 1]" in info.value.message
    request, _, _ = openai_api.parse_request(
        {"model": "sim-small", "temperature": 2, "messages": [{"role": "user", "content": "hi"}]},
        100,
    )
    assert request.temperature == 2.0  # passed on as sent, never clamped


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k"])
@pytest.mark.parametrize("value", [0, 1])
def test_anthropic_version_2026_10_21_refuses_the_sampling_parameters(
    field: str, value: int
) -> None:
    """From anthropic-version 2026-10-21 on, Anthropic refuses temperature, top_p and top_k,
    at their default values too, as fields it does not know; 2023-06-01 takes them (top_p but
    1 and top_k refused by cachemesh, which cannot honour them, as before)."""
    for version in ("2026-10-21", anthropic_api.VERSIONS[-1]):
        with pytest.raises(ApiError) as refused:
            anthropic_api.parse_request(_anthropic(**{field: value}), version=version)
        assert refused.value.message == f"{field}: Extra inputs are not permitted"
        assert refused.value.param == field
    with pytest.raises(ApiError):  # the newest unless told
        anthropic_api.parse_request(_anthropic(**{field: value}))
    if field == "temperature" or (field == "top_p" and value == 1):
        for version in ("2023-01-01", "2023-06-01"):
            request, _ = anthropic_api.parse_request(_anthropic(**{field: value}), version=version)
            assert request.temperature == (value if field == "temperature" else 0)
    else:
        with pytest.raises(ApiError) as unsupported:
            anthropic_api.parse_request(_anthropic(**{field: value}), version="2023-06-01")
        assert "not supported by cachemesh" in unsupported.value.message


MARKED_Q = {"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}


# the Messages API's automatic caching (a top-level cache_control: the breakpoint on the last
# cacheable block, moving forward as the conversation grows) was refused as an unknown field
def test_a_top_level_cache_control_marks_the_requests_last_block() -> None:
    turns: list[Any] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    request, _ = anthropic_api.parse_request(
        _anthropic(messages=turns, system="sys", cache_control={"type": "ephemeral"})
    )
    marked = [
        (m, b) for m, message in enumerate(request.messages)
        for b, block in enumerate(message.content) if block.HasField("cache_control")
    ]  # fmt: skip
    assert marked == [(2, 1)]
    assert request.messages[2].content[1].cache_control.ttl == pb.CACHE_TTL_UNSPECIFIED
    assert not request.system[0].HasField("cache_control")
    hour, _ = anthropic_api.parse_request(
        _anthropic(cache_control={"type": "ephemeral", "ttl": "1h"})
    )
    assert hour.messages[0].content[0].cache_control.ttl == pb.CACHE_TTL_1H
    # the last block already marked with the same TTL: automatic caching is a no-op
    cases: tuple[tuple[dict[str, str], dict[str, str], int], ...] = (
        ({}, {"ttl": "5m"}, pb.CACHE_TTL_UNSPECIFIED),
        ({"ttl": "1h"}, {"ttl": "1h"}, pb.CACHE_TTL_1H),
    )
    for explicit, top, kept in cases:
        marked_q = {**MARKED_Q, "cache_control": {"type": "ephemeral", **explicit}}
        same, _ = anthropic_api.parse_request(
            _anthropic(
                messages=[{"role": "user", "content": [marked_q]}],
                cache_control={"type": "ephemeral", **top},
            )
        )
        assert same.messages[0].content[0].cache_control.ttl == kept


@pytest.mark.parametrize(("explicit", "top"), [("5m", "1h"), ("1h", "5m")])
def test_automatic_caching_over_an_explicit_breakpoint_of_another_ttl_is_refused(
    explicit: str, top: str
) -> None:
    """The docs (automatic caching, edge cases): "If the last block has an explicit
    cache_control with a different TTL, the API returns a 400 error." It was served, billed as
    the longer TTL, where the provider bills nothing."""
    marked_q = {**MARKED_Q, "cache_control": {"type": "ephemeral", "ttl": explicit}}
    body = _anthropic(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, marked_q]}],
        cache_control={"type": "ephemeral", "ttl": top},
    )
    with pytest.raises(ApiError) as raised:
        anthropic_api.parse_request(body)
    error = raised.value
    assert error.kind == "invalid_request" and error.param == "cache_control"
    assert "messages.0.content.1.cache_control" in error.message
    assert f"'{explicit}'" in error.message and f"'{top}'" in error.message


@pytest.mark.parametrize(
    ("control", "names"),
    [({"type": "persistent"}, "cache_control.type"), ({"type": "ephemeral", "ttl": "2h"},
      "cache_control.ttl"), ("yes", "cache_control")],
)  # fmt: skip
def test_a_bad_top_level_cache_control_names_the_field(control: object, names: str) -> None:
    with pytest.raises(ApiError) as raised:
        anthropic_api.parse_request(_anthropic(cache_control=control))
    assert raised.value.kind == "invalid_request" and names in raised.value.message


def test_automatic_caching_over_four_breakpoints_is_refused_naming_the_top_level_field() -> None:
    """Four explicit breakpoints and a top-level cache_control: the automatic one would be a
    fifth, which the router refused as "got 5", naming breakpoints the caller never set."""
    four = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
            for i in range(4)]  # fmt: skip
    body = _anthropic(
        messages=[{"role": "user", "content": [*four, {"type": "text", "text": "q"}]}],
        cache_control={"type": "ephemeral"},
    )
    with pytest.raises(ApiError) as raised:
        anthropic_api.parse_request(body)
    assert raised.value.param == "cache_control" and "already hold 4" in raised.value.message
    # the last block marked already: one breakpoint there, four in all, served
    body["messages"][0]["content"] = four
    request, _ = anthropic_api.parse_request(body)
    assert sum(b.HasField("cache_control") for b in request.messages[0].content) == 4


def _rpc_error(
    code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str | bytes], ...]
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=message
    )


@pytest.mark.parametrize(
    ("message", "reason", "status"),
    [
        # a provider's own words for a prompt over the window: a 413 by the text alone
        ("prompt is too long: 210,000 tokens > 200,000 maximum", CONTEXT_WINDOW, 400),
        # a size limit whose message happens to mention the window: a 400 by the text alone
        ("9,000,000 bytes over the limit (before any context window is counted)",
         REQUEST_TOO_LARGE, 413),
    ],
)  # fmt: skip
def test_a_gateway_size_refusal_is_told_by_its_error_info_reason_not_its_text(
    message: str, reason: str, status: int
) -> None:
    """The router says why a RESOURCE_EXHAUSTED is not a rate limit with a google.rpc.ErrorInfo
    reason; the front went by the message's words ("context window"), which a reworded
    message or a provider's own text turned into the other status."""
    trailers = refusal_trailers(Code.RESOURCE_EXHAUSTED, message, reason)
    error = api_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailers))
    assert error.status_for("anthropic") == status and error.status_for("openai") == status
    assert error.headers().get("x-should-retry") == "false"


def test_a_gateway_unsupported_value_has_openais_code() -> None:
    """The Gateway's refusal of a temperature but 1 to a model that takes only its default
    (its ErrorInfo ``UNSUPPORTED_VALUE``) is answered as OpenAI answers it, ``code``
    ``unsupported_value`` (before, null), and as Anthropic does (no code in its shape); another
    INVALID_ARGUMENT keeps the null code."""
    message = (
        "temperature: gpt-5 takes only its default, 1 (its provider refuses any other value "
        "for it); omit temperature or send 1, got 0.5"
    )
    trailers = refusal_trailers(Code.INVALID_ARGUMENT, message, UNSUPPORTED_VALUE)
    error = api_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, message, trailers))
    assert error.status_for("openai") == 400 and error.status_for("anthropic") == 400
    assert error.body_for("openai", "req_1")["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "param": None,  # the chat handler's: the field the message names (at_caller)
        "code": "unsupported_value",
    }
    assert error.body_for("anthropic", "req_1")["error"] == {
        "type": "invalid_request_error",
        "message": message,
    }
    assert error.headers() == {"x-should-retry": "false"}
    plain = api_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "model: unknown", ()))
    assert plain.body_for("openai", "req_1")["error"]["code"] is None
    # a reason of a RESOURCE_EXHAUSTED on an INVALID_ARGUMENT changes nothing
    other = refusal_trailers(Code.INVALID_ARGUMENT, "model: unknown", REQUEST_TOO_LARGE)
    error = api_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "model: unknown", other))
    assert error.status_for("openai") == 400
    assert error.body_for("openai", "req_1")["error"]["code"] is None


@pytest.mark.parametrize("reason", [RATE_LIMITED, BUDGET_EXHAUSTED])
def test_a_gateway_rate_refusal_is_a_429_by_its_reason_without_a_wait(reason: str) -> None:
    """A tenant's limit said by its ErrorInfo reason but with no wait (no RetryInfo, no
    ``retry-after`` trailer) is still a 429 (its SDK's RateLimitError, retried after 1 s), not
    the 413 of a request too large, which no retry lifts."""
    details = status_pb2.Status(
        code=Code.RESOURCE_EXHAUSTED.value, message="over the limit", details=[error_info(reason)]
    ).SerializeToString()
    trailers = ((STATUS_DETAILS_KEY, details),)
    error = api_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit", trailers))
    assert error.status_for("openai") == 429
    assert error.headers() == {"retry-after": "1"}


@pytest.mark.parametrize(
    ("message", "wait", "status", "headers"),
    [
        # no wait, no words: a limit the front does not know, retried, not a final 413
        ("over the tenant's concurrency", None, 429, {"retry-after": "1"}),
        ("over the tenant's concurrency", 30, 429, {"retry-after": "30"}),
        ("the prompt is over the context window", None, 400, {"x-should-retry": "false"}),
    ],
)
def test_a_gateway_refusal_of_an_unknown_reason_goes_by_its_wait_and_words(
    message: str, wait: int | None, status: int, headers: dict[str, str]
) -> None:
    """A RESOURCE_EXHAUSTED whose ErrorInfo reason the front does not know (a newer
    Gateway's) became a final 413 (x-should-retry: false) by the reason alone: its wait and
    its words tell instead, and without either it is a 429 the SDKs retry."""
    trailers: list[tuple[str, str | bytes]] = list(
        refusal_trailers(Code.RESOURCE_EXHAUSTED, message, "CONCURRENCY_LIMITED")
    )
    if wait is not None:
        trailers.append(("retry-after", str(wait)))
    error = api_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, message, tuple(trailers)))
    assert error.status_for("anthropic") == status and error.status_for("openai") == status
    assert error.headers() == headers


@pytest.mark.parametrize("tier", ["flex", "priority", "scale", "batch"])
def test_an_openai_service_tier_that_changes_the_price_is_refused(tier: str) -> None:
    """cachemesh answers and bills every request at the standard tier: a ``flex`` request
    (half the price at OpenAI) was answered and billed at the standard price, and a
    ``priority`` one served at the standard speed, each with a 200 that did not say so."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": tier}
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(body, 10)
    assert refused.value.param == "service_tier"
    assert f"service_tier: {tier!r} is not supported" in refused.value.message
    assert "'auto' or 'default'" in refused.value.message


@pytest.mark.parametrize("tier", ["auto", "default"])
def test_an_openai_service_tier_of_the_standard_tier_is_served(tier: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": tier}
    openai_api.parse_request(body, 10)


@pytest.mark.parametrize("tier", ["priority", "bogus", "flex"])
def test_an_anthropic_service_tier_not_in_the_api_is_refused(tier: str) -> None:
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(_anthropic(service_tier=tier))
    assert "service_tier" in refused.value.message and "'standard_only'" in refused.value.message


@pytest.mark.parametrize("tier", ["auto", "standard_only"])
def test_an_anthropic_service_tier_of_the_api_is_served(tier: str) -> None:
    anthropic_api.parse_request(_anthropic(service_tier=tier))


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant"])
def test_an_openai_participant_name_is_accepted_and_not_carried(role: str) -> None:
    """A message's ``name`` was refused with a 400 (the Gateway has no participant names):
    that broke AutoGen, which sends a name on every user message, and LangGraph's multi-agent
    graphs, on every request. It is accepted and not carried: the Gateway request is the one
    the same message without a name makes."""
    messages: list[dict[str, Any]] = [{"role": role, "content": "hi", "name": "alice"}]
    if role != "user":
        messages.append({"role": "user", "content": "hi"})
    named = openai_api.parse_request({"model": "m", "messages": messages}, 10)
    for message in messages:
        message.pop("name", None)
    assert named == openai_api.parse_request({"model": "m", "messages": messages}, 10)


def test_an_openai_name_that_is_no_string_is_refused_and_an_empty_one_served() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body["messages"][0]["name"] = 5
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(body, 10)
    assert "messages[0].name: expected a string" in refused.value.message
    for nothing in ("", None):
        body["messages"][0]["name"] = nothing
        openai_api.parse_request(body, 10)


def test_an_openai_strict_function_tool_is_accepted_and_not_carried() -> None:
    """``strict: true`` was refused with a 400 (the Gateway's tools carry no strict flag):
    openai's ``pydantic_function_tool`` (what ``.parse()`` with tools sends) and the OpenAI
    Agents SDK set it on every tool, so each of their requests was refused. It is accepted
    (type-checked) and not carried: the caller's SDK parses the arguments."""

    class Weather(pydantic.BaseModel):
        city: str

    tool: dict[str, Any] = dict(openai.pydantic_function_tool(Weather))
    assert tool["function"]["strict"] is True  # the SDK's helper sends it
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    strict = openai_api.parse_request(body, 10)
    tool["function"]["strict"] = False
    assert strict == openai_api.parse_request(body, 10)
    tool["function"]["strict"] = "yes"
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(body, 10)
    assert "tools[0].function.strict: expected a boolean" in refused.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"stop": ["\n"]},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"n": 2},
    ],
)
def test_each_openai_field_refused_says_what_to_send_instead(fields: dict[str, Any]) -> None:
    """As the README's error table says: "the message names the field and what to send
    instead" (some named only the field: "logprobs: not supported by cachemesh")."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(body, 10)
    (name,) = fields
    assert refused.value.param == name
    assert "omit it" in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"stop_sequences": ["\n"]},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"thinking": {"type": "adaptive"}},
    ],
)
def test_each_anthropic_field_refused_says_what_to_send_instead(fields: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(_anthropic(**fields))
    (name,) = fields
    assert refused.value.message.startswith(name)
    assert "omit it" in refused.value.message, refused.value.message


_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "said", "names"),
    [
        # a system message is no Gateway message: the Gateway's messages[2] is the caller's [3]
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": ["x", ""]},
            ],
            "messages[2].content[1].text: text blocks must not be empty",
            "messages[3].content[1].text: text blocks must not be empty",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            "messages[0].role: the first message must be the user's (ROLE_USER)",
            "messages[1].role: the first message must be the user's",
        ),
        # a tool message and the user message after it are one Gateway turn
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [_CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "user", "content": "more"},
            ],
            "messages[2].content[1].text: too long",
            "messages[3].content: too long",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_CALL]}],
            "messages[1].content[0].tool_use.name: 'f' is not a declared tool",
            "messages[1].tool_calls[0].function.name: 'f' is not a declared tool",
        ),
    ],
)
def test_a_gateway_refusal_names_the_openai_callers_message_not_the_gateways(
    messages: list[Any], said: str, names: str
) -> None:
    """The Gateway's messages are not the caller's (system messages leave them, a tool message
    joins the user turn after it), so its refusals named another message: a live stack, the
    empty text of the caller's messages[3] was refused as "messages[2].content[0].text" (the
    caller's assistant message), an assistant message first after the system one as
    "messages[0].role". The front names the caller's message, the Gateway's path kept."""
    for message in messages:
        if isinstance(message["content"], list) if "content" in message else False:
            message["content"] = [{"type": "text", "text": t} for t in message["content"]]
    origins = openai_api.Origins()
    openai_api.parse_request({"model": "m", "messages": messages}, 10, origins)
    message = openai_api.at_caller(said, origins)
    assert message.startswith(names), message
    assert said.split(":")[0] in message  # the Gateway's own path, as it said it


_TABLE = load_model_table()
_TOOLS = [{"type": "function", "function": {"name": "f"}}]
_S = {"role": "system", "content": "s"}


def _call(call_id: str, name: str = "f") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def _marked(text: str, ttl: str | None = None) -> list[dict[str, Any]]:
    control = {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}
    return [{"type": "text", "text": text, "cache_control": control}]


@pytest.mark.parametrize(
    ("body", "names", "param"),
    [
        # both indices of the message, the second one in its text too
        (
            {
                "messages": [
                    _S,
                    _S,
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [_call("c1"), _call("c2")]},
                    {"role": "tool", "tool_call_id": "c1", "content": "r"},
                    {"role": "user", "content": "go"},
                ]
            },
            "messages[3].tool_calls[1]: 'c2' has no tool_result in messages[4] to messages[5];",
            "messages[3].tool_calls[1]",
        ),
        # a tool result's id is the tool message's tool_call_id
        (
            {
                "messages": [
                    _S,
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "zz", "content": "r"},
                ]
            },
            "messages[2].tool_call_id: 'zz' matches no earlier tool_use block",
            "messages[2].tool_call_id",
        ),
        # a second call's undeclared tool, after the assistant's text
        (
            {
                "messages": [
                    _S,
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": "let me",
                        "tool_calls": [_call("c1"), _call("c2", "g")],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "r"},
                    {"role": "tool", "tool_call_id": "c2", "content": "r"},
                ]
            },
            "messages[2].tool_calls[1].function.name: 'g' is not a declared tool",
            "messages[2].tool_calls[1].function.name",
        ),
        # every breakpoint of the list is the caller's
        (
            {
                "messages": [
                    _S,
                    *[
                        m
                        for k in range(5)
                        for m in (
                            {"role": "user", "content": _marked(f"u{k}")},
                            {"role": "assistant", "content": "a"},
                        )
                    ],
                    {"role": "user", "content": "q"},
                ]
            },
            "cache_control: at most 4 breakpoints per request, got 5 (messages[1].content[0], "
            "messages[3].content[0], messages[5].content[0], messages[7].content[0], "
            "messages[9].content[0])",
            "cache_control",
        ),
        # a tool message's breakpoint is its part's; the ttl kept
        (
            {
                "messages": [
                    _S,
                    {"role": "user", "content": _marked("a")},
                    {"role": "assistant", "tool_calls": [_call("c1")]},
                    {
                        "role": "tool",
                        "tool_call_id": "c1",
                        "content": [{"type": "text", "text": "x"}, *_marked("r", "1h")],
                    },
                ]
            },
            "messages[3].content[1].cache_control.ttl: a 1-hour breakpoint must come before",
            "messages[3].content[1].cache_control.ttl",
        ),
        # an empty content string after a system message
        (
            {"messages": [_S, {"role": "user", "content": " "}]},
            "messages[1].content: text blocks must not be empty",
            "messages[1].content",
        ),
    ],
)
def test_a_gateway_refusal_names_every_path_as_the_openai_caller_sent_it(
    body: dict[str, Any], names: str, param: str
) -> None:
    """A review (D3, paths.py, live stack) found the mapping partial: only the start of a
    message was rewritten ("messages[3].tool_calls[1]: 'c2' has no tool_result in
    messages[2]" kept the Gateway's second index), a breakpoint list kept all the Gateway's
    indices, and the field was dropped from param ("messages[2]" for an unknown
    tool_call_id). Each refusal here is the router's own validation of the parsed request."""
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request(
        {"model": "sim-small", "tools": _TOOLS, **body}, 10, origins
    )
    with pytest.raises(RequestError) as refused:
        validate_request(request, _TABLE, set(_TABLE.models))
    said = openai_api.at_caller(refused.value.message, origins)
    assert said.startswith(names), said
    assert openai_api.param_of(said, origins) == param
    # the Gateway's path it began with, in parentheses, when that is not the caller's
    assert ("(the Gateway's" in said) == (not refused.value.message.startswith(param + ":"))


def test_a_gateway_refusal_of_max_tokens_names_the_field_the_caller_sent() -> None:
    """OpenAI callers set max_completion_tokens (or max_tokens, or neither: the front's
    default): the Gateway's "max_tokens" named a field the caller did not send."""
    said = "max_tokens: must be > 0, got 0"
    for sent, param in (("max_completion_tokens", "max_completion_tokens"), (None, None)):
        origins = openai_api.Origins()
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        if sent is not None:
            body[sent] = 0
        openai_api.parse_request(body, 10, origins)
        assert openai_api.param_of(openai_api.at_caller(said, origins), origins) == param
    # the Gateway's request_id is the caller's Idempotency-Key header, no body field
    assert openai_api.param_of("request_id: 'x' was already used", origins) is None


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            Code.INVALID_ARGUMENT,
            "request_id: 'order-7' was already used for a different request; use a new "
            "request_id for a new request",
        ),
        (
            Code.UNAVAILABLE,
            "the m model failed mid-answer (UNAVAILABLE); retry with the same request_id",
        ),
    ],
)
def test_a_gateway_message_names_the_http_callers_idempotency_key(code: Code, message: str) -> None:
    """An HTTP caller sets the Gateway's request_id as its Idempotency-Key header: "retry with
    the same request_id" told it of a field it cannot send."""
    error = from_gateway(code, message)
    assert "request_id" not in error.message
    assert "Idempotency-Key" in error.message


@pytest.mark.parametrize("quoted_id", ["messages[0].text", "it's messages[0]", "ROLE_USER"])
def test_a_value_the_refusal_quotes_is_not_rewritten_as_a_path(quoted_id: str) -> None:
    """The caller-path rewrite also rewrote a path inside a value the message quotes: a
    tool_call_id of 'messages[0].text' (no tool call has it) was shown back as
    'messages[1].text', an id the caller never sent."""
    body = {
        "model": "sim-small",
        "tools": _TOOLS,
        "messages": [
            _S,
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": quoted_id, "content": "42"},
        ],
    }
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request(body, 10, origins)
    with pytest.raises(RequestError) as refused:
        validate_request(request, _TABLE, set(_TABLE.models))
    said = openai_api.at_caller(refused.value.message, origins)
    assert said.startswith("messages[2].tool_call_id: "), said
    assert f"{quoted_id!r} matches no earlier" in said, said


def test_anthropic_usage_serves_the_thinking_tokens_the_sdk_reads() -> None:
    """Of the output, the thinking's tokens as the provider reported them (reasoning_tokens)
    are served as the Messages API's ``usage.output_tokens_details.thinking_tokens``, which
    the anthropic SDK reads into its Message and message_delta usage (read here by its own
    types); none reported, none claimed. Before, not served: the SDK's None for 2 reported."""
    end = _end(pb.ContentBlock(text="a"))
    end.usage.reasoning_tokens = 2  # of the 3 output tokens, the model's thinking
    message = anthropic.types.Message.model_validate(anthropic_api.response(end))
    assert message.usage.output_tokens_details is not None
    assert (message.usage.output_tokens, message.usage.output_tokens_details.thinking_tokens) == (
        3,
        2,
    )
    stream = anthropic_api.EventStream()
    (_, delta), _stop = stream.end(end, {})
    event = anthropic.types.RawMessageDeltaEvent.model_validate(delta)
    assert event.usage.output_tokens_details is not None
    assert event.usage.output_tokens_details.thinking_tokens == 2
    end.usage.reasoning_tokens = 0  # none reported
    assert "output_tokens_details" not in anthropic_api.response(end)["usage"]
    assert (
        anthropic.types.Message.model_validate(
            anthropic_api.response(end)
        ).usage.output_tokens_details
        is None
    )


_Q = {"role": "user", "content": "q"}
_MORE = {"role": "user", "content": "more"}


@pytest.mark.parametrize(
    "empty",
    [
        {"content": ""},  # the front's (and OpenAI's) empty answer
        # ... as the stream helper's final message dumps it (ChatCompletionStreamState)
        {"content": ""}
        | {k: None for k in ("refusal", "annotations", "audio", "tool_calls", "parsed")},
        {"content": " \n"},
        {"content": [{"type": "text", "text": ""}]},
        {"content": []},
    ],
)
def test_an_empty_openai_answer_sent_back_is_no_gateway_turn(empty: dict[str, Any]) -> None:
    """OpenAI takes an assistant message with no text; the Gateway has no empty message: the
    user messages around it are one turn (as Anthropic combines consecutive turns), which the
    Gateway's validation takes. It was a 400 "needs content or tool_calls"."""
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request(
        {"model": "sim-small", "messages": [_Q, {"role": "assistant", **empty}, _MORE]},
        10,
        origins,
    )
    assert [m.role for m in request.messages] == [pb.ROLE_USER]
    assert [b.text for b in request.messages[0].content] == ["q", "more"]
    validate_request(request, _TABLE, set(_TABLE.models))
    # the Gateway's refusal of the joined turn's second block names the caller's messages[2]
    said = "messages[0].content[1].text: too long"
    assert openai_api.at_caller(said, origins).startswith("messages[2].content: too long")


@pytest.mark.parametrize(
    ("message", "field", "code"),
    [
        ({"role": "assistant"}, "content", None),
        ({"role": "assistant", "refusal": " "}, "content", None),
        ({"role": "assistant", "content": "ok", "tool_calls": []}, "tool_calls", "empty_array"),
        ({"role": "assistant", "content": None, "tool_calls": []}, "tool_calls", "empty_array"),
    ],
)
def test_an_openai_answer_shape_openai_refuses_is_refused_naming_the_field(
    message: dict[str, Any], field: str, code: str | None
) -> None:
    """OpenAI refuses an assistant message with no content at all and no tool calls, and
    ``tool_calls: []`` (the loopback's 400s, in OpenAI's words): the front took both (dropped
    as an empty answer; the empty array ignored), so a history it took was one OpenAI
    refuses. (``content: null`` OpenAI refuses too, and the front takes: the next test.)"""
    body = {"model": "gpt-4o", "messages": [_Q, message, _MORE]}
    assert openai_wire.refusal({}, body) is not None  # the API's refusal too
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(body, 10)
    assert refused.value.message.startswith(f"messages[1].{field}: "), refused.value.message
    assert refused.value.param == f"messages[1].{field}"
    assert refused.value.openai_code == code


_ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "k"}


def test_an_anthropic_empty_answer_last_is_no_prefill() -> None:
    """The Messages API takes a last assistant message with no block (the front's own empty
    answer is ``content: []``). The front refused it (the Gateway's "a message needs at least
    one block"): now no prefill."""
    last = {"model": "claude-haiku-4-5", "max_tokens": 10}
    last["messages"] = [_Q, {"role": "assistant", "content": []}]
    assert anthropic_wire.refusal(_ANTHROPIC_HEADERS, last) is None
    request, _ = anthropic_api.parse_request(last)
    assert [m.role for m in request.messages] == [pb.ROLE_USER]
    validate_request(request, _TABLE, set(_TABLE.models))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param([], id="no block"),
        pytest.param([{"type": "text", "text": ""}], id="an empty text block"),
        pytest.param([{"type": "text", "text": " "}], id="a whitespace-only runaway"),
        pytest.param([{"type": "text", "text": ""}, {"type": "text", "text": "\n"}], id="two"),
        pytest.param(" ", id="a whitespace string"),
        pytest.param("", id="an empty string"),
    ],
)
def test_an_anthropic_empty_answer_before_the_last_is_no_gateway_turn(content: Any) -> None:
    """The front's own empty answers (``content: []``; ``[{"type": "text", "text": " "}]`` for
    a whitespace-only runaway) sent back before the last message: the API refuses them (the
    loopback's 400), and so did the front (the Gateway's "a message needs at least one block"
    / "text blocks must not be empty"), with no next step for a client replaying the history
    it got. Now no Gateway turn, as the OpenAI front's, and the user messages around it one
    turn, as the API combines consecutive turns of a role (they were two Gateway turns: the
    assertion here said so, the API's behaviour says otherwise); ``kept`` maps the Gateway's
    messages and blocks to the caller's for its refusals' paths."""
    body: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 10}
    answer = {"role": "assistant", "content": content}
    body["messages"] = [_Q, answer, _MORE, {"role": "assistant", "content": "a"}, _MORE]
    assert anthropic_wire.refusal(_ANTHROPIC_HEADERS, body) is not None  # the API's 400
    kept: list[anthropic_api.Turn] = []
    request, _ = anthropic_api.parse_request(body, kept=kept)
    assert [m.role for m in request.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert [b.text for b in request.messages[0].content] == ["q", "more"]
    assert [t.messages for t in kept] == [[0, 2], [3], [4]]
    validate_request(request, _TABLE, set(_TABLE.models))
    said = "messages[0].content[1].text: too long; messages[2], messages[0] and messages[9] too"
    assert anthropic_api.at_caller(said, kept) == (
        "messages.2.content.0.text: too long; messages.4, messages.0 to messages.2 and "
        "messages.9 too"
    )


def test_consecutive_anthropic_turns_of_a_role_are_one_gateway_turn() -> None:
    """The Messages API combines consecutive user or assistant turns into one; the front sent
    them as two Gateway turns (the Gateway takes them: no check of alternation), so a model of
    an OpenAI or self-hosted row saw two user turns where Anthropic's model saw one, and the
    conversation's cached prefix was not the one the OpenAI front (which joins them) made of
    it. Their blocks are one turn's, each named by the caller's message and block."""
    use = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "r"}
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [result]},
        {"role": "user", "content": "more"},
    ]
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": messages}
    body["tools"] = [{"name": "f", "input_schema": {"type": "object"}}]
    kept: list[anthropic_api.Turn] = []
    request, _ = anthropic_api.parse_request(body, kept=kept)
    assert [m.role for m in request.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert [b.WhichOneof("kind") for b in request.messages[2].content] == ["tool_result", "text"]
    assert [t.blocks for t in kept] == [[(0, 0), (0, 1), (1, 0)], [(2, 0)], [(3, 0), (4, 0)]]
    validate_request(request, _TABLE, set(_TABLE.models))
    said = "messages[0].content[2].text: too long"
    assert anthropic_api.at_caller(said, kept) == "messages.1.content.0.text: too long"
    # automatic caching names the block it marks as the caller does
    body["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    messages[4] = {
        "role": "user",
        "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
    }
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(body)
    assert "(messages.4.content.0.cache_control: '5m')" in refused.value.message


@pytest.mark.parametrize(
    ("messages", "empty"),
    [
        pytest.param([{"role": "user", "content": []}, _MORE], 0, id="empty first"),
        pytest.param([_Q, {"role": "user", "content": []}], 1, id="empty second"),
        pytest.param([{"role": "user", "content": []}], 0, id="empty only"),
    ],
)
def test_an_anthropic_user_message_with_no_block_is_refused_not_merged_away(
    messages: list[dict[str, Any]], empty: int
) -> None:
    """The API refuses a user message with no block ("all messages must have non-empty
    content except for the optional final assistant message", the loopback's 400); beside
    another user message, ``_join`` merged it away and the front took it (alone it reached
    the Gateway's "a message needs at least one block"). Refused, naming the caller's field."""
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": messages}
    assert anthropic_wire.refusal(_ANTHROPIC_HEADERS, body) is not None  # the API's 400
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(body)
    assert refused.value.message.startswith(
        f"messages.{empty}.content: a message needs at least one block"
    ), refused.value.message
    assert refused.value.param == f"messages.{empty}.content"


def test_a_gateway_role_reaches_an_anthropic_caller_in_the_apis_words() -> None:
    """The Gateway's refusal names its enum's role ("the first message must be the user's
    (ROLE_USER)"), which an Anthropic caller never sends: it says ``"role": "user"``."""
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
    }
    kept: list[anthropic_api.Turn] = []
    request, _ = anthropic_api.parse_request(body, kept=kept)
    with pytest.raises(RequestError) as refused:
        validate_request(request, _TABLE, set(_TABLE.models))
    assert "ROLE_USER" in refused.value.message
    said = anthropic_api.at_caller(refused.value.message, kept)
    assert said == 'messages.0.role: the first message must be the user\'s ("role": "user")'
    assert anthropic_api.at_caller("messages[1].role: must be ROLE_USER or ROLE_ASSISTANT") == (
        "messages.1.role: must be 'user' or 'assistant'"
    )
    # the OpenAI front said it so too, whenever no path of the refusal changed (no system
    # message before the assistant's)
    origins = openai_api.Origins()
    openai_api.parse_request({"model": "m", "messages": body["messages"]}, 10, origins)
    assert openai_api.at_caller(refused.value.message, origins) == (
        "messages[0].role: the first message must be the user's"
    )


def test_an_anthropic_request_of_empty_answers_only_says_so() -> None:
    """An empty final assistant message alone was the Gateway's "messages: at least one message
    is required" (the front had dropped it unsaid); now it is named, and why."""
    for messages, first in (
        ([{"role": "assistant", "content": []}], "the only message"),
        ([{"role": "assistant", "content": " "}, {"role": "assistant", "content": []}], "each"),
    ):
        with pytest.raises(ApiError) as refused:
            anthropic_api.parse_request({"model": "m", "max_tokens": 1, "messages": messages})
        assert refused.value.message.startswith(f"messages.0: {first}"), refused.value.message
        assert "send at least one user message" in refused.value.message


def test_a_breakpoint_on_an_empty_anthropic_answer_is_refused_not_dropped() -> None:
    part = {"type": "text", "text": "", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(ApiError) as refused:
        anthropic_api.parse_request(
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [_Q, {"role": "assistant", "content": [part]}, _MORE],
            }
        )
    assert refused.value.message.startswith("messages.1.content.0.cache_control: ")


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": None, "refusal": " "},
        # as the Python SDK's stream helper dumps a message of content null
        {"role": "assistant"}
        | {k: None for k in ("content", "refusal", "annotations", "audio", "tool_calls")},
    ],
)
def test_an_openai_answer_of_content_null_is_an_empty_answer_though_openai_refuses_it(
    message: dict[str, Any],
) -> None:
    """``content: null`` without tool calls is OpenAI's 400 (the loopback's), but the front
    takes it as an empty answer (no Gateway turn): the Node SDK's stream helper builds it from
    the front's own streamed empty answer whatever chunk ends it (tests/sdk_records.py). The
    front refused it for a while, and such a client replaying its history got a 400."""
    body = {"model": "gpt-4o", "messages": [_Q, message, _MORE]}
    assert openai_wire.refusal({}, body) is not None  # the API's refusal
    request, _, _ = openai_api.parse_request(body | {"model": "sim-small"}, 10)
    assert [m.role for m in request.messages] == [pb.ROLE_USER]
    assert [b.text for b in request.messages[0].content] == ["q", "more"]
    validate_request(request, _TABLE, set(_TABLE.models))


@pytest.mark.parametrize(
    ("stop", "texts", "chunks", "message"),
    sdk_records.OPENAI_NODE_EMPTY_ANSWERS,
    ids=[sdk_records.record_id(r) for r in sdk_records.OPENAI_NODE_EMPTY_ANSWERS],
)
def test_the_node_sdks_message_of_a_streamed_empty_answer_is_taken_back(
    stop: str, texts: list[str], chunks: list[dict[str, Any]], message: dict[str, Any]
) -> None:
    """The front still streams the chunks the Node SDK's message was recorded from (else record
    it again: tests/sdk_records.py), and that message (``content: null``) sent back is an empty
    answer, no Gateway turn; it was a 400 "null or missing in an assistant message"."""
    end = pb.CompleteResponse(request_id="r1", model="sim-small", stop_reason=stop)
    assert _openai_stream([pb.ContentBlock(text=text) for text in texts], end) == chunks
    request, _, _ = openai_api.parse_request(
        {"model": "sim-small", "messages": [_Q, message, _MORE]}, 10
    )
    assert [m.role for m in request.messages] == [pb.ROLE_USER]
    validate_request(request, _TABLE, set(_TABLE.models))


def test_an_empty_openai_answer_last_is_no_prefill() -> None:
    request, _, _ = openai_api.parse_request(
        {"model": "m", "messages": [_Q, {"role": "assistant", "content": ""}]}, 10
    )
    assert [m.role for m in request.messages] == [pb.ROLE_USER]


def test_an_empty_openai_answer_with_tool_calls_keeps_only_its_calls() -> None:
    for content in ("", None, [{"type": "text", "text": ""}]):
        request, _, _ = openai_api.parse_request(
            _history({"role": "assistant", "content": content, "tool_calls": [_call("c1")]}), 10
        )
        assert [b.WhichOneof("kind") for b in request.messages[1].content] == ["tool_use"]


def test_a_breakpoint_on_an_empty_answer_part_is_refused_not_dropped() -> None:
    part = {"type": "text", "text": "", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request(
            {
                "model": "m",
                "messages": [
                    _Q,
                    {"role": "assistant", "content": [{"type": "text", "text": "a"}, part]},
                ],
            },
            10,
        )
    assert refused.value.message.startswith("messages[1].content[1].cache_control: ")


@pytest.mark.parametrize("content", ["", []])
def test_an_openai_answer_its_model_refused_keeps_the_refusal_as_its_text(content: Any) -> None:
    """OpenAI's answer its model refused has its words in ``refusal``: sent back, it was taken
    as an empty answer and dropped unsaid (the model never saw it had refused). Its refusal is
    the assistant's text; a Gateway refusal of it names the field. (``content: null``: the
    next test.)"""
    refused = {"role": "assistant", "content": content, "refusal": "I can't help with that."}
    assert openai_wire.refusal({}, {"model": "gpt-4o", "messages": [_Q, refused, _MORE]}) is None
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request(
        {"model": "sim-small", "messages": [_Q, refused, _MORE]}, 10, origins
    )
    assert [m.role for m in request.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert [b.text for b in request.messages[1].content] == ["I can't help with that."]
    validate_request(request, _TABLE, set(_TABLE.models))
    said = "messages[1].content[0].text: too long"
    assert openai_api.at_caller(said, origins).startswith("messages[1].refusal: too long")
    # with text in the content, the content is the answer; an empty refusal is no text (and
    # with content null, no answer: OpenAI's 400, as test_an_openai_answer_shape_... shows)
    for message in (
        {"role": "assistant", "content": "ok", "refusal": "no"},
        {"role": "assistant", "content": "", "refusal": " "},
    ):
        request, _, _ = openai_api.parse_request(
            {"model": "sim-small", "messages": [_Q, message, _MORE]}, 10
        )
        texts = [b.text for m in request.messages for b in m.content]
        assert texts == (["q", "ok", "more"] if message["content"] else ["q", "more"])


@pytest.mark.parametrize("content", [{"content": None}, {}])
def test_an_openai_refused_answer_of_content_null_is_taken_as_its_refusal(
    content: dict[str, Any],
) -> None:
    """OpenAI's refused answer as an SDK returns it (``content: null``, the words in
    ``refusal``), appended to a history and sent back: the loopback refuses it (OpenAI's
    reference makes content "Required unless `tool_calls` or `function_call` is specified"),
    the front takes it as the refusal's text, knowingly looser (``_answer_shape``), as it
    takes OpenAI's own forms (a refusal part; content beside the refusal). Beside tool calls,
    content null is OpenAI's form, and the refusal the text."""
    refused = {"role": "assistant", "refusal": "I can't help with that."} | content
    body = {"model": "gpt-4o", "messages": [_Q, refused, _MORE]}
    assert openai_wire.refusal({}, body) is not None  # OpenAI's 400 (by its reference)
    part = {"role": "assistant", "content": [{"type": "refusal", "refusal": refused["refusal"]}]}
    for taken in (refused, part, refused | {"content": "", "refusal": refused["refusal"]}):
        body = {"model": "gpt-4o", "messages": [_Q, taken, _MORE]}
        request, _, _ = openai_api.parse_request(body | {"model": "sim-small"}, 10)
        assert [b.text for b in request.messages[1].content] == ["I can't help with that."]
    for taken in (part, refused | {"content": "", "refusal": refused["refusal"]}):
        body = {"model": "gpt-4o", "messages": [_Q, taken, _MORE]}
        assert openai_wire.refusal({}, body) is None  # as OpenAI takes it
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = refused | {"content": None, "tool_calls": [call]}
    request, _, _ = openai_api.parse_request({"model": "m", "messages": [_Q, with_call]}, 10)
    assert [b.text for b in request.messages[1].content][:1] == ["I can't help with that."]
    bare = {"role": "assistant", "refusal": "  "}  # no words, no content: OpenAI's 400 and ours
    with pytest.raises(ApiError) as said:
        openai_api.parse_request({"model": "m", "messages": [_Q, bare, _MORE]}, 10)
    assert said.value.param == "messages[1].content"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": ""}],
        [{"role": "assistant", "content": ""}, {"role": "assistant", "content": []}],
    ],
)
def test_a_request_of_empty_answers_only_is_refused_naming_the_first(
    messages: list[dict[str, Any]],
) -> None:
    """It was "messages: at least one message is required" (the router's, of the Gateway's
    request with no turn), though the caller sent messages: now it names the empty answer."""
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request({"model": "sim-small", "messages": messages}, 10)
    assert refused.value.message.startswith(
        "messages[0]: an empty assistant answer (no text, no refusal, no tool_calls) is not a turn"
    )
    assert refused.value.param == "messages[0]"


def test_an_assistants_refusal_part_is_kept_as_its_text() -> None:
    """OpenAI's assistant content takes ``{"type": "refusal", "refusal": ...}`` parts: one was
    a 400 ("'refusal' parts are not supported") while a top-level ``refusal`` was kept. The
    part's words are the assistant's text, and a Gateway refusal of it names the part's field;
    a user's refusal part is still refused."""
    part = {"type": "refusal", "refusal": "I can't help with that."}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Well."}, part]}
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request(
        {"model": "sim-small", "messages": [_Q, answer, _MORE]}, 10, origins
    )
    assert [b.text for b in request.messages[1].content] == ["Well.", "I can't help with that."]
    validate_request(request, _TABLE, set(_TABLE.models))
    said = "messages[1].content[1].text: too long"
    assert openai_api.at_caller(said, origins).startswith("messages[1].content[1].refusal: ")
    with pytest.raises(ApiError, match="'refusal' parts are not supported"):
        openai_api.parse_request(
            {"model": "sim-small", "messages": [{"role": "user", "content": [part]}]}, 10
        )


def test_a_system_message_and_an_empty_answer_is_refused_for_no_user_message() -> None:
    """It said "the request has no other message" of a request that had a system message."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": ""}]
    with pytest.raises(ApiError) as refused:
        openai_api.parse_request({"model": "sim-small", "messages": messages}, 10)
    assert "the request has no user message" in refused.value.message, refused.value.message
    assert refused.value.param == "messages[1]"


# a path as the Messages API writes one (``messages.1.content.0.tool_use.name``) or as the
# Gateway and Chat Completions do (``messages[1].content[0].tool_use.name``)
_ANY_PATH = re.compile(
    r"\b(?:messages|system|tools)(?:\.\d+|\[\d+\])(?:\.content(?:\.\d+|\[\d+\]))?(?:\.\w+)*"
)
_BRACKETED = re.compile(r"\b(?:messages|system|tools|content)\[\d+\]")
_DOTTED = re.compile(r"\b(?:messages|system|tools|content)\.\d")
_U = {"role": "user", "content": "q"}


def _use(use_id: str, name: str = "f") -> dict[str, Any]:
    return {"type": "tool_use", "id": use_id, "name": name, "input": {}}


def _result(use_id: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": use_id, "content": "r"}


_ANTHROPIC_TOOL = {"name": "f", "input_schema": {"type": "object"}}


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (
            {"messages": [_U, {"role": "assistant", "content": [_use("t1", "g")]}]},
            "messages.1.content.0.tool_use.name: 'g' is not a declared tool",
        ),
        (
            {
                "tools": [_ANTHROPIC_TOOL],
                "messages": [_U, {"role": "assistant", "content": [_use("t1")]}, _U],
            },
            "messages.1.content.0.tool_use: 't1' has no tool_result in messages.2;",
        ),
        (
            {
                "tools": [_ANTHROPIC_TOOL],
                "messages": [
                    _U,
                    {"role": "assistant", "content": [_use("t1")]},
                    {"role": "user", "content": [_result("t1"), _result("t9")]},
                ],
            },
            "messages.2.content.1.tool_result.tool_use_id: 't9' matches no earlier",
        ),
        (
            {
                "model": "claude-sonnet-4-5",
                "tools": [
                    _ANTHROPIC_TOOL,
                    {
                        "name": "h",
                        "input_schema": {"type": "object", "properties": {"a": {"type": "dict"}}},
                    },
                ],
                "messages": [_U],
            },
            "tools.1.input_schema: tool 'h': properties['a'].type: 'dict' is not a JSON Schema",
        ),
        (
            {
                "system": [
                    {"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}},
                ],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "text",
                                "text": "q",
                                "cache_control": {"type": "ephemeral", "ttl": "1h"},
                            }
                        ],
                    }
                ],
            },
            "messages.0.content.0.cache_control.ttl: a 1-hour breakpoint must come before",
        ),
    ],
)
def test_a_gateway_refusal_names_the_fields_as_the_messages_api_does(
    body: dict[str, Any], names: str
) -> None:
    """The Gateway's refusals write paths as Chat Completions does (``messages[1].content[0]``),
    and the Anthropic front passed them on so: an Anthropic SDK user read a field path in a
    form their API never uses (its own 400s say ``messages.1.content.0.tool_use.id``). Each
    refusal here is the router's own validation of the parsed request; only the paths' form
    changes (the indices map one to one), the rest of the words are the Gateway's."""
    request, _ = anthropic_api.parse_request({"model": "sim-small", "max_tokens": 10, **body})
    with pytest.raises(RequestError) as refused:
        validate_request(request, _TABLE, set(_TABLE.models))
    gateway = refused.value.message
    said = anthropic_api.at_caller(gateway)
    assert said.startswith(names), said
    outside_quotes = re.sub(r"'[^']*'", "''", said)
    assert not _BRACKETED.search(outside_quotes), said
    assert _ANY_PATH.sub("<path>", said) == _ANY_PATH.sub("<path>", gateway)


@pytest.mark.parametrize(
    ("gateway", "said"),
    [
        # the Gateway's names of JSON text fields are the Messages API's
        (
            "messages[1].content[0].tool_use.input_json: must be a JSON object",
            "messages.1.content.0.tool_use.input: must be a JSON object",
        ),
        (
            "system[0].text: text blocks must not be empty",
            "system.0.text: text blocks must not be empty",
        ),
        # a value the message quotes is the caller's own, kept as sent
        (
            "messages[3].content[0].tool_result.tool_use_id: 'messages[0].text' matches no "
            "earlier tool_use",
            "messages.3.content.0.tool_result.tool_use_id: 'messages[0].text' matches no "
            "earlier tool_use",
        ),
        # a provider's words name the provider's request, in its form: quoted as it said them
        (
            "openai refused the request (400): Invalid parameter: Duplicate value for "
            "'tool_call_id' of 'c1', in messages[2] and messages[4].",
            "openai refused the request (400): Invalid parameter: Duplicate value for "
            "'tool_call_id' of 'c1', in messages[2] and messages[4].",
        ),
        ("max_tokens: must be > 0, got 0", "max_tokens: must be > 0, got 0"),
    ],
)
def test_the_anthropic_front_rewrites_only_the_gateways_own_paths(gateway: str, said: str) -> None:
    assert anthropic_api.at_caller(gateway) == said


def test_a_providers_words_in_a_gateway_refusal_are_kept_as_it_said_them() -> None:
    """A refusal a model replica passed on quotes its provider ("openai refused the request
    (400): ..."), whose paths name the provider's request by its own indices: the OpenAI front
    rewrote an unquoted one as if it were the Gateway's (OpenAI's messages[2], the system
    message counted, became messages[3]); an Anthropic provider's dotted paths are its own
    too. The Gateway's words before them are still rewritten."""
    origins = openai_api.Origins()
    messages = [_S, _U, {"role": "assistant", "content": "a"}, _U]
    openai_api.parse_request({"model": "m", "messages": messages}, 10, origins)
    theirs = (
        "openai refused the request (400): Invalid parameter: Duplicate value for "
        "'tool_call_id' of 'c1', in messages[2] and messages[3].",
        "anthropic refused the request (400): messages.1.content.0: unexpected `tool_use_id`",
        "openai refused the request: messages[2] and messages[3]",
    )
    for said in theirs:
        assert openai_api.at_caller(said, origins) == said
        assert anthropic_api.at_caller(said) == said
    ours = "messages[1].content[0].text: openai refused the request (400): messages[2]"
    assert openai_api.at_caller(ours, origins).startswith(
        "messages[2].content: openai refused the request (400): messages[2] (the Gateway's"
    )
    assert anthropic_api.at_caller(ours) == (
        "messages.1.content.0.text: openai refused the request (400): messages[2]"
    )


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [_U, {"role": "assistant", "tool_calls": [_call("c1", "g")]}]},
        {
            "tools": _TOOLS,
            "messages": [_S, _U, {"role": "assistant", "tool_calls": [_call("c1")]}, _U],
        },
        {
            "tools": _TOOLS,
            "messages": [
                _U,
                {"role": "assistant", "tool_calls": [_call("c1")]},
                {"role": "tool", "tool_call_id": "c9", "content": "r"},
            ],
        },
    ],
)
def test_a_gateway_refusal_to_an_openai_caller_names_no_dotted_path(body: dict[str, Any]) -> None:
    """The other way: the OpenAI front's Gateway refusals keep Chat Completions' form."""
    origins = openai_api.Origins()
    request, _, _ = openai_api.parse_request({"model": "sim-small", **body}, 10, origins)
    with pytest.raises(RequestError) as refused:
        validate_request(request, _TABLE, set(_TABLE.models))
    said = openai_api.at_caller(refused.value.message, origins)
    assert _BRACKETED.search(said), said
    assert not _DOTTED.search(said), said
