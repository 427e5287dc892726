"""The loopback Anthropic server refuses, with the real API's 400 and words, the request
shapes the real API refuses, so that a regression sending one fails a test rather than being
answered: a message after tool calls not beginning with their tool_result blocks (the router
passed text before a tool_result until then, and the loopback server answered it: 5 of 5), a
result matching no call, a message with no block but a last assistant one, an empty or
blank text block, more than 4 breakpoints, a 1-hour
breakpoint after a 5-minute one, max_tokens 0, a temperature above 1, a tool_use id outside
the API's pattern, a tool's input_schema naming a type JSON Schema has not (BFCL's ``dict``,
``tuple``: answered before, 2 of 2). Each shape's fixed form is answered. And the replica
sends a tool id another model wrote in the API's pattern."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.model.providers.anthropic_wire import tool_id
from services.model.providers.api import ProviderApi
from tests.providers.loopback import anthropic_replica, post_messages, serving
from tests.providers.wire_server import Seen, WireServer

CLAUDE = "claude-haiku-4-5"
TOOLS = [{"name": "calc", "input_schema": {"type": "object"}}]
USE = {"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {}}
CALL = {"role": "assistant", "content": [USE]}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}
NOTE = {"type": "text", "text": "here it is"}
ASK = {"role": "user", "content": "compute"}


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


def _post(server: WireServer, body: dict[str, Any]) -> tuple[int, str | None]:
    status, error = post_messages(server, body, "2023-06-01")
    if error is None:
        return status, None
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    return status, str(error["error"]["message"])


def _body(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": CLAUDE, "max_tokens": 16, "tools": TOOLS, "messages": messages} | fields


def _marked(ttl: str | None) -> dict[str, Any]:
    control = {"type": "ephemeral"} | ({"ttl": ttl} if ttl else {})
    return {"type": "text", "text": "context", "cache_control": control}


def _schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"name": "plan", "input_schema": {"type": "object", "properties": properties}}


# (refused body, its fixed form, the start of the API's message)
CASES = {
    "text before the result": (
        _body([ASK, CALL, {"role": "user", "content": [NOTE, RESULT]}]),
        _body([ASK, CALL, {"role": "user", "content": [RESULT, NOTE]}]),
        "messages.2: Did not find 1 tool_result block(s) at the beginning of this message.",
    ),
    "no result after the call": (
        _body([ASK, CALL, {"role": "user", "content": [NOTE]}]),
        _body([ASK, CALL, {"role": "user", "content": [RESULT]}]),
        "messages.2: Did not find 1 tool_result block(s)",
    ),
    "a result matching no call": (
        _body([ASK, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [RESULT]}]),
        _body([ASK, CALL, {"role": "user", "content": [RESULT]}]),
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1.",
    ),
    # anthropics/claude-code#6774, #4416: the API's words (the front's empty answer is [])
    "an empty answer before the last message": (
        _body([ASK, {"role": "assistant", "content": []}, ASK]),
        _body([ASK, {"role": "assistant", "content": "ok"}, ASK]),
        "messages.1: all messages must have non-empty content except for the optional final "
        "assistant message",
    ),
    "a user message with no block": (
        _body([{"role": "user", "content": []}]),
        _body([ASK]),
        "messages.0: all messages must have non-empty content except for the optional final "
        "assistant message",
    ),
    "an empty text block": (
        _body([{"role": "user", "content": [{"type": "text", "text": ""}]}]),
        _body([{"role": "user", "content": [{"type": "text", "text": "x"}]}]),
        "messages: text content blocks must be non-empty",
    ),
    "a blank system block": (
        _body([ASK], system=[{"type": "text", "text": "  "}]),
        _body([ASK], system=[{"type": "text", "text": "be brief"}]),
        "system: text content blocks must contain non-whitespace text",
    ),
    "five breakpoints": (
        _body([{"role": "user", "content": [_marked(None)] * 5}]),
        _body([{"role": "user", "content": [_marked(None)] * 4}]),
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    ),
    "1h after 5m": (
        _body([{"role": "user", "content": [_marked("1h")]}], system=[_marked("5m")]),
        _body([{"role": "user", "content": [_marked("5m")]}], system=[_marked("1h")]),
        "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block.",
    ),
    "an input_schema type JSON Schema has not": (
        _body([ASK], tools=[{"name": "calc", "input_schema": {"type": "dict"}}]),
        _body([ASK], tools=[{"name": "calc", "input_schema": {"type": "object"}}]),
        "tools.0.custom.input_schema: JSON schema is invalid. It must match JSON Schema draft "
        "2020-12",
    ),
    "a nested type JSON Schema has not": (
        _body([ASK], tools=[TOOLS[0], _schema({"p": {"type": "tuple", "items": {}}})]),
        _body([ASK], tools=[TOOLS[0], _schema({"p": {"type": "array", "items": {}}})]),
        "tools.1.custom.input_schema: JSON schema is invalid.",
    ),
    "max_tokens 0": (
        _body([ASK], max_tokens=0),
        _body([ASK], max_tokens=1),
        "max_tokens: Input should be greater than or equal to 1",
    ),
    "temperature above 1": (
        _body([ASK], temperature=1.5),
        _body([ASK], temperature=1.0),
        "temperature: Input should be less than or equal to 1",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loopback_server_refuses_what_the_api_refuses(server: WireServer, case: str) -> None:
    refused, fixed, message = CASES[case]
    status, said = _post(server, refused)
    assert status == 400
    assert said is not None and said.startswith(message), said
    assert _post(server, fixed) == (200, None)


def test_the_loopback_server_refuses_a_tool_use_id_the_api_refuses(server: WireServer) -> None:
    use = USE | {"id": "functions.calc:0"}
    result = RESULT | {"tool_use_id": "functions.calc:0"}
    turns: list[dict[str, Any]] = [
        ASK,
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [result]},
    ]
    status, said = _post(server, _body(turns))
    assert (status, said) == (
        400,
        "messages.1.content.0.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'",
    )


@pytest.fixture
async def replica(server: WireServer) -> AsyncIterator[ProviderApi]:
    async for api in anthropic_replica(server, CLAUDE):
        yield api


async def _sent_with_a_calc_tool(
    server: WireServer, replica: ProviderApi, messages: list[pb.Message]
) -> Seen:
    """``messages`` generated by ``replica`` with one tool, ``calc``: the body the loopback
    server took (its 200: the body is one the real API takes)."""
    request = pb.CompleteRequest(
        model=CLAUDE, max_tokens=16, tools=[pb.Tool(name="calc")], messages=messages
    )
    call = model_pb2.GenerateRequest(tenant="t", model=CLAUDE, request=request)
    chunks = [chunk async for chunk in replica.generate(call, 10.0)]
    assert chunks[-1].HasField("end")
    (sent,) = server.seen_by("anthropic")
    assert sent.status == 200
    return sent


async def test_tool_ids_another_model_wrote_are_sent_as_ids_the_api_takes(
    server: WireServer, replica: ProviderApi
) -> None:
    """A conversation whose tool calls an OpenAI-compatible engine made (ids like
    ``functions.calc:0``; ``auto`` may answer its next turn with Claude) reaches Claude with
    each id in the API's pattern, each tool_result still naming its call's, two ids differing
    in a refused character still two, a valid id unchanged. Before, sent as they were: the
    real API's 400 to every such turn (5 of 5 refused by the loopback server's check)."""
    ids = ["functions.calc:0", "functions.calc.0", "toolu_01A-b"]
    messages = [pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="6*7?")])]
    for call_id in ids:
        use = pb.ToolUse(id=call_id, name="calc", input_json="{}")
        messages.append(pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(tool_use=use)]))
        result = pb.ToolResult(tool_use_id=call_id, content="42")
        messages.append(
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(tool_result=result)])
        )
    sent = await _sent_with_a_calc_tool(server, replica, messages)
    body = sent.body["messages"]
    uses = [body[m]["content"][0]["id"] for m in (1, 3, 5)]
    results = [body[m]["content"][0]["tool_use_id"] for m in (2, 4, 6)]
    assert uses == results
    assert len(set(uses)) == 3
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]+", sent_id) for sent_id in uses)
    assert uses[2] == "toolu_01A-b"


async def test_a_users_text_before_its_tool_results_is_sent_after_them(
    server: WireServer, replica: ProviderApi
) -> None:
    """A user turn of text, then the results of the call before it (a turn OpenAI-compatible
    engines take: ``openai_wire`` sends the results first, as ``tool`` messages) reaches Claude
    with its results first, each group in its order: the API refuses a message after a tool
    call that does not begin with its results (the loopback server's check, its words)."""
    use = pb.ToolUse(id="toolu_1", name="calc", input_json="{}")
    turn = [
        pb.ContentBlock(text="Here is the result:"),
        pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="toolu_1", content="42")),
        pb.ContentBlock(text="what next?"),
    ]
    messages = [
        pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="6*7?")]),
        pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(tool_use=use)]),
        pb.Message(role=pb.ROLE_USER, content=turn),
    ]
    sent = await _sent_with_a_calc_tool(server, replica, messages)
    kinds = [block["type"] for block in sent.body["messages"][2]["content"]]
    texts = [block.get("text") for block in sent.body["messages"][2]["content"]]
    assert kinds == ["tool_result", "text", "text"]
    assert texts[1:] == ["Here is the result:", "what next?"]


async def test_a_rewritten_tool_id_never_meets_another_id_of_the_request(
    server: WireServer, replica: ProviderApi
) -> None:
    """An id outside the pattern is sent as its rewrite (``tool_id``), which may be an id the
    request already holds (a client's own id; a rewrite never reaches a client): each still goes
    as an id of its own, each result paired with its call. Before, both went as one id: the
    real API's 400, "`tool_use` ids must be unique" (the loopback server's check)."""
    clash = tool_id("functions.calc:0")
    ids = ["functions.calc:0", clash, "functions.calc:1", f"{tool_id('functions.calc:1')}_2"]
    ids.append(tool_id("functions.calc:1"))
    messages = [pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="6*7?")])]
    for call_id in ids:
        use = pb.ToolUse(id=call_id, name="calc", input_json="{}")
        messages.append(pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(tool_use=use)]))
        result = pb.ToolResult(tool_use_id=call_id, content=call_id)
        messages.append(
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(tool_result=result)])
        )
    sent = await _sent_with_a_calc_tool(server, replica, messages)
    body = sent.body["messages"]
    uses = [body[m]["content"][0]["id"] for m in range(1, len(body), 2)]
    results = [body[m]["content"][0] for m in range(2, len(body), 2)]
    assert [r["tool_use_id"] for r in results] == uses  # each result still names its call
    assert [r["content"] for r in results] == ids
    assert len(set(uses)) == len(ids)
    assert uses[1] == clash and uses[3] == ids[3] and uses[4] == ids[4]  # valid ids unchanged
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]+", sent_id) for sent_id in uses)
