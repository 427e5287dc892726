"""A provider's tool call is cached by L1 in a namespace of SEMANTIC_CACHE_TOOL_USE_NAMESPACES.

A turn that calls a tool ends with stop_reason ``tool_use`` (Anthropic says so, and OpenAI's
``tool_calls`` is mapped to it). L1's Store refused every answer not ending ``end_turn`` before
it read the namespace rule, so the setting cached nothing: the same request called the
provider again. Here the provider is the loopback Anthropic server behind a provider replica.
"""

from __future__ import annotations

import json
import uuid

import pytest

from cachemesh import Client
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.provider_stack import TOOL_USE_NAMESPACE, ProviderStack, text, user
from tests.providers import anthropic_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

_WEATHER = pb.Tool(
    name="get_weather",
    description="The weather at a place.",
    input_schema_json=json.dumps(
        {"type": "object", "properties": {"location": {"type": "string"}}}
    ),
)


def _tool_call_twice(
    providers: ProviderStack,
    namespace: str,
    arguments: str = '{"location": "Oslo"}',
    asking: str = "Do I need a coat in Oslo?",
) -> list[pb.CompleteResponse]:
    """The same request twice, the provider scripted to answer each with a get_weather call
    (a script L1 left unread is taken back: the session's later tests script their own);
    returns both responses, having checked that those not from L1 reached the provider."""
    question = f"{asking} (ticket {uuid.uuid4().hex[:8]})"
    usage = anthropic_wire.Usage(input_tokens=40, output_tokens=12)
    call = anthropic_wire.ToolCall("toolu_l1cache01", "get_weather", [arguments])
    reply = Reply(
        events=anthropic_wire.stream(
            "claude-sonnet-4-5-20250929", ["Let me check. "], usage,
            stop_reason="tool_use", tool=call,
        )
    )  # fmt: skip
    request = pb.CompleteRequest(
        model="claude-sonnet-4-5",
        max_tokens=128,
        temperature=0.0,
        tools=[_WEATHER],
        messages=[user(text(question))],
        cache=pb.CacheOptions(namespace=namespace),
    )
    server = providers.server
    responses: list[pb.CompleteResponse] = []
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        for _ in range(2):
            server.script("anthropic", reply)
            try:
                responses.append(client.complete(request))
            finally:
                server.scripts["anthropic"] = [
                    r for r in server.scripts["anthropic"] if r is not reply
                ]
    calls = [s for s in providers.server.seen_by("anthropic") if question in json.dumps(s.body)]
    first = responses[0]
    assert first.served_by != pb.LAYER_SEMANTIC_CACHE and first.stop_reason == "tool_use"
    assert [b.tool_use.name for b in first.content if b.HasField("tool_use")] == ["get_weather"]
    assert len(calls) == (1 if responses[1].served_by == pb.LAYER_SEMANTIC_CACHE else 2)
    return responses


def test_a_tool_call_is_served_from_l1_in_a_tool_use_namespace(providers: ProviderStack) -> None:
    first, second = _tool_call_twice(providers, TOOL_USE_NAMESPACE)
    assert second.served_by == pb.LAYER_SEMANTIC_CACHE  # before: the provider called again
    assert second.stop_reason == "tool_use"
    assert second.content == first.content


def test_a_tool_call_is_not_cached_in_another_namespace(providers: ProviderStack) -> None:
    _, second = _tool_call_twice(providers, "faq")
    assert second.served_by != pb.LAYER_SEMANTIC_CACHE


def test_a_tool_call_whose_arguments_are_not_json_is_not_cached(providers: ProviderStack) -> None:
    """The model wrote the call's arguments as broken JSON (cut short): the answer reaches the
    client with them kept as ``_unparsed_arguments``, but L1 does not keep it. Before, it was
    stored and served to the question and its paraphrases for the whole TTL: every agent
    asking got the same unusable call instead of a fresh model sample."""
    # a question of its own: the first test's entry (a paraphrase of its) is servable here
    asking = "Which museums in Bergen open on Mondays?"
    first, second = _tool_call_twice(providers, TOOL_USE_NAMESPACE, '{"location": "Os', asking)
    [use] = [b.tool_use for b in first.content if b.HasField("tool_use")]
    assert json.loads(use.input_json) == {"_unparsed_arguments": '{"location": "Os'}
    assert second.served_by != pb.LAYER_SEMANTIC_CACHE  # before: served from L1
