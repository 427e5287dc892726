"""Stream shapes real engines send that the providers' documentation does not show, read by
the adapters through the real SDKs against the loopback server: OpenAI-compatible chunks with
``"choices": null``, parallel tool calls under one index or none, a failure after an answer's
final event, and an Anthropic-compatible engine's input count reported only at message_delta."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1.prompt_pb2 import PromptFacts
from tests.integration.test_provider_streams import (
    CLAUDE,
    GPT,
    _api,
    _ends,
    _generate,
    loopback_providers,
)
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Event, Reply, WireServer, dumps


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from loopback_providers()


def _chunk(choices: list[dict[str, Any]] | None, usage: dict[str, Any] | None = None) -> Event:
    """A chat.completion.chunk; ``choices`` None is sent as ``"choices": null``."""
    body = {
        "id": "chatcmpl-loopback",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": GPT,
        "choices": choices,
        "usage": usage,
    }
    return None, dumps(body)


def _choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


DONE: Event = (None, "[DONE]")
USAGE = openai_wire.usage(30, 0, 3)


def _text(chunks: list[model_pb2.GenerateChunk]) -> str:
    return "".join(c.text for c in chunks if c.WhichOneof("part") == "text")


@pytest.mark.parametrize(
    "events",
    [
        # the usage chunk with choices null (pydantic-ai #5165, pipecat #1060), not []
        [
            _chunk(_choice({"content": "Paris is "})),
            _chunk(_choice({"content": "the capital."})),
            _chunk(_choice({}, "stop")),
            _chunk(None, USAGE),
            DONE,
        ],
        # a heartbeat mid-answer: choices null, nothing else
        [
            _chunk(_choice({"content": "Paris is "})),
            _chunk(None),
            _chunk(_choice({"content": "the capital."})),
            _chunk(_choice({}, "stop")),
            _chunk([], USAGE),
            DONE,
        ],
    ],
    ids=["usage-chunk", "heartbeat"],
)
def test_an_openai_chunk_with_null_choices_carries_no_choice(
    server: WireServer, events: list[Event]
) -> None:
    """Before, ``for choice in chunk.choices`` raised TypeError on it: after the first token
    an interrupted end, which the router re-runs on another replica (one SDK call was 6
    engine calls, billed 6 times, ending in a 503)."""
    server.script("openai", Reply(events=events))
    before = len(server.seen_by("openai"))
    chunks = _generate(_api(server, "openai"), GPT)
    (end,) = _ends(chunks)
    assert not end.interrupted and end.stop_reason == "end_turn", end
    assert _text(chunks) == "Paris is the capital."
    assert (end.output_tokens, end.provider_usage.openai.prompt_tokens) == (3, 30)
    assert len(server.seen_by("openai")) == before + 1


def test_an_openai_failure_after_the_finish_reason_and_the_usage_ends_the_answer(
    server: WireServer,
) -> None:
    """An error chunk (an engine's, as vLLM sends one) after the answer's finish_reason and its
    usage chunk: the answer and its bill are whole, as when only the connection is lost there;
    it ends as answered (before: interrupted, and the router ran it again elsewhere)."""
    error = {"message": "engine shutting down", "type": "InternalServerError", "code": 500}
    events = [
        _chunk(_choice({"content": "Paris."})),
        _chunk(_choice({}, "stop")),
        _chunk([], USAGE),
        (None, dumps({"error": error})),
    ]
    server.script("openai", Reply(events=events))
    chunks = _generate(_api(server, "openai"), GPT)
    (end,) = _ends(chunks)
    assert not end.interrupted and end.stop_reason == "end_turn", end
    assert end.output_tokens == 3 and _text(chunks) == "Paris."


def test_an_openai_failure_after_the_finish_reason_but_before_the_usage_is_interrupted(
    server: WireServer,
) -> None:
    """The bill is not whole yet: the break stays a break."""
    error = {"message": "engine shutting down", "type": "InternalServerError", "code": 500}
    events = [
        _chunk(_choice({"content": "Paris."})),
        _chunk(_choice({}, "stop")),
        (None, dumps({"error": error})),
    ]
    server.script("openai", Reply(events=events))
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    assert end.interrupted and not end.HasField("provider_usage")


def _call(index: int | None, call_id: str | None, name: str | None, arguments: str) -> Event:
    call: dict[str, Any] = {"type": "function", "function": {"arguments": arguments}}
    if index is not None:
        call["index"] = index
    if call_id is not None:
        call["id"] = call_id
    if name is not None:
        call["function"]["name"] = name
    return _chunk(_choice({"tool_calls": [call]}))


def _calls(chunks: list[model_pb2.GenerateChunk]) -> list[tuple[str, str, Any]]:
    uses = [c.block.tool_use for c in chunks if c.WhichOneof("part") == "block"]
    return [(use.id, use.name, json.loads(use.input_json)) for use in uses]


def _tool_turn(*calls: Event) -> Reply:
    return Reply(events=[*calls, _chunk(_choice({}, "tool_calls")), _chunk([], USAGE), DONE])


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # Ollama (#15457) sends every call of a turn as index 0
        (
            _tool_turn(
                _call(0, "call_a", "file_write", '{"filePath":"hello.py"}'),
                _call(0, "call_b", "file_write", '{"filePath":"world.py"}'),
            ),
            [
                ("call_a", "file_write", {"filePath": "hello.py"}),
                ("call_b", "file_write", {"filePath": "world.py"}),
            ],
        ),
        # and in pieces, each call's later pieces under its index without an id
        (
            _tool_turn(
                _call(0, "call_a", "add", ""),
                _call(0, None, None, '{"a":'),
                _call(0, None, None, "1}"),
                _call(0, "call_b", "mul", '{"b":'),
                _call(0, None, None, "2}"),
            ),
            [("call_a", "add", {"a": 1}), ("call_b", "mul", {"b": 2})],
        ),
        # an engine that leaves the index out
        (
            _tool_turn(
                _call(None, "call_a", "add", '{"a":1}'),
                _call(None, "call_b", "mul", '{"b":2}'),
            ),
            [("call_a", "add", {"a": 1}), ("call_b", "mul", {"b": 2})],
        ),
        # ... its later pieces without an id continue the call they follow
        (
            _tool_turn(
                _call(None, "call_a", "add", '{"a":'),
                _call(None, None, None, "1}"),
                _call(None, "call_b", "mul", '{"b":2}'),
            ),
            [("call_a", "add", {"a": 1}), ("call_b", "mul", {"b": 2})],
        ),
        # OpenAI's own: one index a call, the id on its first piece only (as before)
        (
            _tool_turn(
                _call(0, "call_a", "add", ""),
                _call(0, None, None, '{"a":1}'),
                _call(1, "call_b", "mul", ""),
                _call(1, None, None, '{"b":2}'),
            ),
            [("call_a", "add", {"a": 1}), ("call_b", "mul", {"b": 2})],
        ),
        # an engine repeating the call's id on each of its pieces: still one call
        (
            _tool_turn(
                _call(0, "call_a", "add", '{"a":'),
                _call(0, "call_a", None, "1}"),
            ),
            [("call_a", "add", {"a": 1})],
        ),
        # Poolside (pool#9): the call's later pieces under another id, before its JSON is
        # whole: one call (the last id kept, as before dedb78c)
        (
            _tool_turn(
                _call(0, "call_A", "get_weather", '{"city":'),
                _call(0, "call_B", None, ' "Paris"}'),
            ),
            [("call_B", "get_weather", {"city": "Paris"})],
        ),
        # a fresh id on each piece of one call
        (
            _tool_turn(
                _call(0, "call_1", "get_weather", ""),
                _call(0, "call_2", None, '{"city":'),
                _call(0, "call_3", None, ' "Paris"}'),
            ),
            [("call_3", "get_weather", {"city": "Paris"})],
        ),
        # Atlas (#33): one call opened twice (two ids, its name), then its arguments
        (
            _tool_turn(
                _call(0, "call_2", "web_search", ""),
                _call(0, "call_3", "web_search", ""),
                _call(0, None, None, '{"city": "Paris"}'),
            ),
            [("call_3", "web_search", {"city": "Paris"})],
        ),
        # a tool without parameters (no arguments sent), then another call under its index
        (
            _tool_turn(
                _call(0, "call_1", "get_time", ""),
                _call(0, "call_2", "get_weather", '{"city": "Paris"}'),
            ),
            [("call_1", "get_time", {}), ("call_2", "get_weather", {"city": "Paris"})],
        ),
    ],
    ids=[
        "same-index",
        "same-index-pieces",
        "no-index",
        "no-index-pieces",
        "openai",
        "id-repeated",
        "new-id-mid-call",
        "new-id-each-piece",
        "opened-twice",
        "no-arguments-then-another",
    ],
)
def test_parallel_tool_calls_under_one_index_or_none_stay_apart(
    server: WireServer, reply: Reply, expected: list[tuple[str, str, Any]]
) -> None:
    """A piece carrying an id other than the one held at its index, or an id and no index,
    starts a new call once the held call's arguments are whole JSON (vercel/ai #14277's
    rule); before that it is the same call's. Before dedb78c, parallel calls merged into one:
    the last id, the last name, the arguments of all run together (``_unparsed_arguments``);
    at dedb78c, a call whose pieces changed id split into broken ones (a review's repro)."""
    server.script("openai", reply)
    chunks = _generate(_api(server, "openai"), GPT)
    assert _calls(chunks) == expected
    (end,) = _ends(chunks)
    assert end.stop_reason == "tool_use" and not end.interrupted


def _anthropic_input_at_delta(start_input: int | None) -> list[Event]:
    """An Anthropic-compatible engine (SGLang #20678, mlx-node) whose message_start reports
    ``input_tokens`` 0 or null and whose message_delta reports the real count, 25."""
    events = anthropic_wire.stream(CLAUDE, ["Paris."], anthropic_wire.Usage(25, output_tokens=5))
    for n, (name, data) in enumerate(events):
        body = json.loads(data)
        if name == "message_start":
            body["message"]["usage"]["input_tokens"] = start_input
        elif name == "message_delta":
            body["usage"]["input_tokens"] = 25
        events[n] = (name, dumps(body))
    return events


@pytest.mark.parametrize("start_input", [0, None])
@pytest.mark.parametrize("planned", [1000, 10])
def test_an_anthropic_input_count_reported_at_message_delta_is_billed_as_reported(
    server: WireServer, start_input: int | None, planned: int
) -> None:
    """Plan's count fills in only a count the provider never reported. Before, it was filled
    in at message_start and the real count of message_delta lost to it (the larger kept):
    25 reported, Plan's 1,000 billed."""
    server.script("anthropic", Reply(events=_anthropic_input_at_delta(start_input)))
    api = _api(server, "anthropic")
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital of France?")])
    request = model_pb2.GenerateRequest(
        tenant="t",
        model=CLAUDE,
        request=pb.CompleteRequest(model=CLAUDE, max_tokens=16, messages=[question]),
        prompt=PromptFacts(prompt_tokens=planned),
    )

    async def run() -> list[model_pb2.GenerateChunk]:
        return [chunk async for chunk in api.generate(request, 5.0)]

    (end,) = _ends(asyncio.run(run()))
    assert not end.interrupted
    assert end.provider_usage.anthropic.input_tokens == 25


def test_an_anthropic_error_event_after_message_delta_ends_the_answer(
    server: WireServer,
) -> None:
    """message_delta brought the stop reason and the usage; an ``error`` event then, instead of
    message_stop, ends the answer as answered, as a connection lost there does. Before: an
    interrupted end (the router ran the whole answer again on another replica), its output
    the adapter's count, not the reported 3."""
    events = anthropic_wire.stream(CLAUDE, ["Paris."], anthropic_wire.Usage(20, output_tokens=3))
    assert events[-1][0] == "message_stop"
    events[-1] = ("error", dumps(anthropic_wire.overloaded_body()))
    server.script("anthropic", Reply(events=events))
    before = len(server.seen_by("anthropic"))
    chunks = _generate(_api(server, "anthropic"), CLAUDE)
    (end,) = _ends(chunks)
    assert not end.interrupted and end.stop_reason == "end_turn", end
    assert end.output_tokens == 3 and _text(chunks) == "Paris."
    assert len(server.seen_by("anthropic")) == before + 1
