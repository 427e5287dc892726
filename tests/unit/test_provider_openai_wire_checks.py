"""The loopback OpenAI server refuses, with the real API's 400 and words (through the official
SDK), the Chat Completions shapes the real API refuses, so that a regression sending one fails
a test rather than being answered: a ``tool`` message that answers no call of the assistant
message before it (or comes after another message), an assistant message whose calls are not
all answered before the next message, an assistant message with neither content nor calls,
more than 4 stop sequences, an output limit of 0 or both limits at once, a temperature over 2,
an empty ``tools``, ``tool_choice`` / ``parallel_tool_calls`` without tools, a retention
OpenAI does not know, ``reasoning_effort`` to a model that does not reason, no messages, an
argument Chat Completions does not have, a tool call id over 40 characters, a function
description over 1,024, a function's parameters naming a type JSON Schema has not (BFCL's
``dict``, ``float``). Before, it answered each (19 of 19; the 2 types, 2 of 2). Each shape's
fixed form is answered. And the bodies the adapter builds for a conversation of parallel
tool calls, a failed one among them, are taken."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.models import load_model_table
from services.model.providers.api import ProviderApi
from services.model.providers.openai_wire import chat_params, openai_tool_id
from services.model.providers.tool_ids import tool_ids
from tests.providers import openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import WireServer

GPT = "gpt-4o"
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
ASK = {"role": "user", "content": "compute"}


def _call(*ids: str) -> dict[str, Any]:
    calls = [
        {"id": i, "type": "function", "function": {"name": "calc", "arguments": "{}"}} for i in ids
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def _result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "42"}


def _body(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {
        "model": GPT,
        "max_completion_tokens": 16,
        "tools": TOOLS,
        "messages": messages,
    } | fields


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


@pytest.fixture(scope="module")
def client(server: WireServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="sk-loopback", base_url=f"{server.base}/v1", max_retries=0) as sdk:
        yield sdk


def _send(client: openai.OpenAI, body: dict[str, Any]) -> str:
    """The answer's text as the SDK streams it (every field but model and messages as sent,
    an argument the SDK does not name too)."""
    rest = {k: v for k, v in body.items() if k not in ("model", "messages")}
    chunks = client.chat.completions.create(
        model=body["model"],
        messages=body["messages"],
        stream=True,
        stream_options={"include_usage": True},
        extra_body=rest,
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _described(description: str) -> dict[str, Any]:
    function = {"name": "calc", "parameters": {"type": "object"}, "description": description}
    return {"type": "function", "function": function}


def _typed(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "calc", "parameters": parameters}}


# (refused body, its fixed form, the start of the API's message, its param)
CASES = {
    "a tool message after a user message": (
        _body([ASK, _call("call_1"), ASK, _result("call_1")]),
        _body([ASK, _call("call_1"), _result("call_1"), ASK]),
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        "call_1",
        "messages.[1].role",
    ),
    "a tool message with no call before it": (
        _body([ASK, {"role": "assistant", "content": "ok"}, _result("call_1")]),
        _body([ASK, _call("call_1"), _result("call_1")]),
        "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
        "message with 'tool_calls'.",
        "messages.[2].role",
    ),
    "a tool message answering another call": (
        _body([ASK, _call("call_1"), _result("call_2")]),
        _body([ASK, _call("call_1"), _result("call_1")]),
        "Invalid parameter: 'tool_call_id' of 'call_2' not found in 'tool_calls' of previous "
        "message.",
        "messages.[2].tool_call_id",
    ),
    "a call answered twice": (
        _body([ASK, _call("call_1"), _result("call_1"), _result("call_1")]),
        _body([ASK, _call("call_1"), _result("call_1")]),
        "Invalid parameter: Duplicate value for 'tool_call_id' of 'call_1', in messages[2] and "
        "messages[3].",
        "messages.[3].tool_call_id",
    ),
    "a call id repeated in tool_calls, each answered": (
        _body([ASK, _call("call_1", "call_1"), _result("call_1"), _result("call_1")]),
        _body([ASK, _call("call_1", "call_2"), _result("call_1"), _result("call_2")]),
        "Invalid parameter: Duplicate value for 'tool_call_id' of 'call_1'",
        "messages.[3].tool_call_id",
    ),
    "one of two calls unanswered": (
        _body([ASK, _call("call_1", "call_2"), _result("call_2"), ASK]),
        _body([ASK, _call("call_1", "call_2"), _result("call_2"), _result("call_1"), ASK]),
        "An assistant message with 'tool_calls' must be followed by tool messages",
        "messages.[1].role",
    ),
    "the request ending with a call": (
        _body([ASK, _call("call_1")]),
        _body([ASK, _call("call_1"), _result("call_1")]),
        "An assistant message with 'tool_calls' must be followed by tool messages",
        "messages.[1].role",
    ),
    "an assistant message with neither content nor calls": (
        _body([ASK, {"role": "assistant", "content": None}, ASK]),
        _body([ASK, {"role": "assistant", "content": "ok"}, ASK]),
        "Invalid value for 'content': expected a string, got null.",
        "messages.[1].content",
    ),
    "an assistant message with no content key nor calls": (
        _body([ASK, {"role": "assistant"}, ASK]),
        _body([ASK, {"role": "assistant", "content": ""}, ASK]),
        "Invalid value for 'content': expected a string, got null.",
        "messages.[1].content",
    ),
    # openai/openai-python#2061, home-assistant/core#118577: OpenAI's 400, its words and code
    "an assistant message with an empty tool_calls": (
        _body([ASK, {"role": "assistant", "content": "ok", "tool_calls": []}, ASK]),
        _body([ASK, {"role": "assistant", "content": "ok"}, ASK]),
        "Invalid 'messages[1].tool_calls': empty array. Expected an array with minimum length 1, "
        "but got an empty array instead.",
        "messages[1].tool_calls",
    ),
    "a tool call id over 40 characters": (
        _body([ASK, _call("chatcmpl-tool-" + "0" * 32), _result("chatcmpl-tool-" + "0" * 32)]),
        _body([ASK, _call("chatcmpl-tool-" + "0" * 26), _result("chatcmpl-tool-" + "0" * 26)]),
        "Invalid 'messages[1].tool_calls[0].id': string too long. Expected a string with "
        "maximum length 40, but got a string with length 46 instead.",
        "messages[1].tool_calls[0].id",
    ),
    "five stop sequences": (
        _body([ASK], stop=["a", "b", "c", "d", "e"]),
        _body([ASK], stop=["a", "b", "c", "d"]),
        "Invalid 'stop': array too long. Expected an array with maximum length 4",
        "stop",
    ),
    "max_completion_tokens 0": (
        _body([ASK], max_completion_tokens=0),
        _body([ASK], max_completion_tokens=1),
        "Invalid 'max_completion_tokens': integer below minimum value.",
        "max_completion_tokens",
    ),
    "both output limits": (
        _body([ASK], max_tokens=16),
        _body([ASK]),
        "max_tokens and max_completion_tokens cannot both be set",
        "max_tokens",
    ),
    "temperature above 2": (
        _body([ASK], temperature=2.5),
        _body([ASK], temperature=2),
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2",
        "temperature",
    ),
    "no tools": (
        _body([ASK], tools=[]),
        _body([ASK]),
        "Invalid 'tools': empty array.",
        "tools",
    ),
    "a function description over 1,024 characters": (
        _body([ASK], tools=[_described("x" * 1025)]),
        _body([ASK], tools=[_described("x" * 1024)]),
        "Invalid 'tools[0].function.description': string too long. Expected a string with "
        "maximum length 1024, but got a string with length 1025 instead.",
        "tools[0].function.description",
    ),
    "a parameters type JSON Schema has not": (
        _body([ASK], tools=[_typed({"type": "dict"})]),
        _body([ASK], tools=[_typed({"type": "object"})]),
        "Invalid schema for function 'calc': 'dict' is not valid under any of the given schemas.",
        "tools[0].function.parameters",
    ),
    "a nested parameter's type JSON Schema has not": (
        _body([ASK], tools=[_typed({"type": "object", "properties": {"x": {"type": "float"}}})]),
        _body([ASK], tools=[_typed({"type": "object", "properties": {"x": {"type": "number"}}})]),
        "Invalid schema for function 'calc': 'float' is not valid under any of the given schemas.",
        "tools[0].function.parameters",
    ),
    "tool_choice without tools": (
        {"model": GPT, "messages": [ASK], "tool_choice": "auto"},
        {"model": GPT, "messages": [ASK]},
        "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
        "specified.",
        "tool_choice",
    ),
    "parallel_tool_calls without tools": (
        {"model": GPT, "messages": [ASK], "parallel_tool_calls": True},
        {"model": GPT, "messages": [ASK]},
        "Invalid value for 'parallel_tool_calls'",
        "parallel_tool_calls",
    ),
    "a retention OpenAI does not know": (
        _body([ASK], prompt_cache_retention="in-memory"),
        _body([ASK], prompt_cache_retention="in_memory"),
        "Invalid value: 'in-memory'. Supported values are: 'in_memory' and '24h'.",
        "prompt_cache_retention",
    ),
    "reasoning_effort to a model that does not reason": (
        _body([ASK], reasoning_effort="low"),
        _body([ASK], model="gpt-5", reasoning_effort="low"),
        "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
        "reasoning_effort",
    ),
    "no messages": (
        _body([]),
        _body([ASK]),
        "Invalid 'messages': empty array.",
        "messages",
    ),
    "an argument Chat Completions does not have": (
        _body([ASK], cache_control={"type": "ephemeral"}),
        _body([ASK]),
        "Unrecognized request argument supplied: cache_control",
        None,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loopback_server_refuses_what_the_api_refuses(client: openai.OpenAI, case: str) -> None:
    refused, fixed, message, param = CASES[case]
    with pytest.raises(openai.BadRequestError) as error:
        _send(client, refused)
    assert error.value.status_code == 400
    assert error.value.type == "invalid_request_error"
    said = error.value.body["message"] if isinstance(error.value.body, dict) else None
    assert isinstance(said, str) and said.startswith(message), said
    assert error.value.param == param
    assert _send(client, fixed) == "Paris is the capital of France."


def _text(text: str) -> pb.ContentBlock:
    return pb.ContentBlock(text=text)


def _use(call_id: str) -> pb.ContentBlock:
    return pb.ContentBlock(tool_use=pb.ToolUse(id=call_id, name="calc", input_json="{}"))


def _answer(call_id: str, *, failed: bool = False) -> pb.ContentBlock:
    result = pb.ToolResult(tool_use_id=call_id, content="42", is_error=failed)
    return pb.ContentBlock(tool_result=result)


def test_the_adapters_body_for_parallel_calls_is_one_the_api_takes(
    client: openai.OpenAI,
) -> None:
    """A conversation as the router passes it (a user's text before its results, parallel
    calls, a failed call, a final assistant text) is sent as messages the API takes: each
    call's ``tool`` message right after its assistant message, the text after them."""
    spec = load_model_table().models[GPT]
    request = pb.CompleteRequest(
        model=GPT,
        max_tokens=16,
        tools=[pb.Tool(name="calc", input_schema_json='{"type": "object"}')],
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[_text("compute both")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[_text("on it"), _use("a"), _use("b")]),
            pb.Message(
                role=pb.ROLE_USER,
                content=[_text("here"), _answer("b", failed=True), _answer("a")],
            ),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[_use("c")]),
            pb.Message(role=pb.ROLE_USER, content=[_answer("c")]),
        ],
    )
    body = chat_params(spec, request)
    assert openai_wire.refusal({}, {**body, "stream": True}) is None
    assert [m["role"] for m in body["messages"]] == [
        "user", "assistant", "tool", "tool", "user", "assistant", "tool",
    ]  # fmt: skip
    assert _send(client, body) == "Paris is the capital of France."


@pytest.fixture
async def replica(server: WireServer) -> AsyncIterator[ProviderApi]:
    server.reset()
    settings = provider_settings("openai", f"{server.base}/v1", "sk-loopback-0123456789abcdef")
    api = provider_replica(settings, [GPT], clock=lambda: 1000.0)
    yield api
    await api.close()


async def test_tool_ids_over_openais_length_are_sent_as_ids_it_takes(
    server: WireServer, replica: ProviderApi
) -> None:
    """A conversation whose tool calls another model made with ids over OpenAI's 40
    characters (vLLM's ``chatcmpl-tool-`` and 32 hex digits: ``auto`` may answer the next
    turn with a gpt tier; a client's own) reaches OpenAI with each id at most 40 characters,
    each ``tool`` message still naming its call's, two long ids alike in their first 27
    characters still two, an id of 40 unchanged. Before, sent as they were: the real API's 400
    ("string too long") to every such turn, INVALID_ARGUMENT to the caller."""
    ids = ["chatcmpl-tool-" + "a" * 32, "chatcmpl-tool-" + "a" * 31 + "b", "call_" + "x" * 35]
    messages = [pb.Message(role=pb.ROLE_USER, content=[_text("6*7?")])]
    for call_id in ids:
        messages.append(pb.Message(role=pb.ROLE_ASSISTANT, content=[_use(call_id)]))
        messages.append(pb.Message(role=pb.ROLE_USER, content=[_answer(call_id)]))
    request = pb.CompleteRequest(
        model=GPT, max_tokens=16, tools=[pb.Tool(name="calc")], messages=messages
    )
    call = model_pb2.GenerateRequest(tenant="t", model=GPT, request=request)
    chunks = [chunk async for chunk in replica.generate(call, 10.0)]
    assert chunks[-1].HasField("end")
    (sent,) = server.seen_by("openai")
    assert sent.status == 200
    body = sent.body["messages"]
    uses = [body[m]["tool_calls"][0]["id"] for m in (1, 3, 5)]
    results = [body[m]["tool_call_id"] for m in (2, 4, 6)]
    assert uses == results
    assert len(set(uses)) == 3
    assert all(len(sent_id) <= 40 for sent_id in uses)
    assert uses[2] == ids[2]


def test_an_engines_own_ids_and_arguments_are_not_held_to_openais_rules() -> None:
    """OpenAI's own limits (a tool call id of 40, a description of 1,024, its arguments) are not
    an OpenAI-compatible engine's: vLLM's ids are 46 characters and it takes them back, and
    engines take arguments of their own; the loopback server answers them for an engine's
    model while refusing them for gpt-4o."""
    long_id = "chatcmpl-tool-" + "0" * 32
    body = _body(
        [ASK, _call(long_id), _result(long_id)],
        tools=[_described("x" * 1500)],
        chat_template_kwargs={"enable_thinking": False},
    )
    assert openai_wire.refusal({}, body) is not None
    assert openai_wire.refusal({}, {**body, "model": "meta-llama/Llama-3.1-8B-Instruct"}) is None


def test_the_loopback_server_says_openais_code_for_a_schema_type() -> None:
    """The API's 400 to a parameter type JSON Schema has not carries its own code; an
    OpenAI-compatible engine's model is not held to it (llama-server, vLLM: their own checks,
    if any, are not OpenAI's)."""
    body = _body([ASK], tools=[_typed({"type": "object", "properties": {"x": {"type": "any"}}})])
    refused = openai_wire.refusal({}, body)
    assert refused is not None and refused.body["error"]["code"] == "invalid_function_parameters"
    assert openai_wire.refusal({}, {**body, "model": "meta-llama/Llama-3.1-8B-Instruct"}) is None


def _exchanges(ids: list[str]) -> list[pb.Message]:
    """A user's question, then per id a call and its result (whose content is that id)."""
    messages = [pb.Message(role=pb.ROLE_USER, content=[_text("6*7?")])]
    for call_id in ids:
        result = pb.ToolResult(tool_use_id=call_id, content=call_id)
        messages.append(pb.Message(role=pb.ROLE_ASSISTANT, content=[_use(call_id)]))
        messages.append(
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(tool_result=result)])
        )
    return messages


def test_a_shortened_tool_id_never_meets_another_id_of_the_request() -> None:
    """An id over OpenAI's 40 characters is sent shortened (``openai_tool_id``), which may be
    an id the request already holds (a client's own; a shortened id never reaches a client):
    each still goes as an id of its own, at most 40 characters, each result paired with its
    call, ids that fit unchanged, and a conversation's earlier turns sent alike on its later
    turn (the provider's prompt cache). Before, both went as one id (2 distinct ids -> 1 on
    the wire) and OpenAI paired the results wrongly."""
    spec = load_model_table().models[GPT]
    long_a, long_b = "chatcmpl-tool-" + "a" * 32, "chatcmpl-tool-" + "b" * 32
    clash = chat_params(spec, pb.CompleteRequest(messages=_exchanges([long_a])))["messages"][1]
    clash_id = clash["tool_calls"][0]["id"]  # long_a as it is sent alone
    ids = [long_a, clash_id, long_b, "call_" + "x" * 35]
    earlier = pb.CompleteRequest(model=GPT, max_tokens=16, messages=_exchanges(ids[:3]))
    request = pb.CompleteRequest(model=GPT, max_tokens=16, messages=_exchanges(ids))
    body = chat_params(spec, request)
    assert openai_wire.refusal({}, {**body, "stream": True, "tools": TOOLS}) is None
    messages = body["messages"]
    uses = [messages[m]["tool_calls"][0]["id"] for m in range(1, len(messages), 2)]
    results = [messages[m] for m in range(2, len(messages), 2)]
    assert [r["tool_call_id"] for r in results] == uses  # each result still names its call
    assert [r["content"] for r in results] == ids
    assert len(set(uses)) == len(ids)
    assert all(len(sent_id) <= 40 for sent_id in uses)
    assert uses[1] == clash_id and uses[3] == ids[3]  # ids that fit unchanged
    assert chat_params(spec, earlier)["messages"] == messages[: 1 + 2 * 3]


def test_a_shortened_id_whose_next_candidates_are_taken_goes_as_a_later_one() -> None:
    """The first and second shortened forms of an id both ids of the request: it goes as its
    third, still at most 40 characters and none of the others."""
    spec = load_model_table().models[GPT]
    long_id = "chatcmpl-tool-" + "c" * 32
    ids = [openai_tool_id(long_id), openai_tool_id(long_id, 2), long_id]
    request = pb.CompleteRequest(model=GPT, max_tokens=16, messages=_exchanges(ids))
    messages = chat_params(spec, request)["messages"]
    uses = [messages[m]["tool_calls"][0]["id"] for m in range(1, len(messages), 2)]
    assert uses[:2] == ids[:2]
    assert uses[2] == openai_tool_id(long_id, 3) and len(uses[2]) == 40
    assert len(set(uses)) == 3


def test_a_rewrite_the_provider_would_refuse_is_an_error() -> None:
    """The shared rule checks each rewrite against the provider's bound (an adapter's bug,
    not a request the provider then refuses)."""
    request = pb.CompleteRequest(messages=_exchanges(["x" * 50]))
    with pytest.raises(ValueError, match="does not fit"):
        tool_ids(request, lambda call_id: len(call_id) <= 40, lambda call_id, n: call_id)
