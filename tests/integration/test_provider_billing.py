"""Through the Gateway, each provider backend against its loopback server: a multi-turn agent
conversation with tools and cache breakpoints produces the request body the provider's docs
show, streams as the provider streams, and is billed from the provider's reported usage
(hand-computed nano-dollars from that usage and models.toml's prices); the drift from
prefix-cache's estimate is on the span and in the tenant's Totals; an L1 hit on a
provider-backed answer costs 0; the trace names the layer and the backend."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from cachemesh import Client
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.provider_stack import (
    ProviderStack,
    ask,
    assistant,
    router_spans,
    text,
    user,
)
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}
    },
    "required": ["location"],
}
SYSTEM = "You are a weather assistant for a travel agency. " + " ".join(
    f"Rule {i}: answer in one sentence and name the city." for i in range(60)
)
ONE_HOUR = pb.CacheControl(ttl=pb.CACHE_TTL_1H)


def _collect(client: Client, request: pb.CompleteRequest) -> tuple[list[str], pb.CompleteResponse]:
    kinds: list[str] = []
    end = None
    for chunk in client.stream(request):
        part = chunk.WhichOneof("part")
        if part == "delta":
            kinds.append(f"delta:{chunk.delta.WhichOneof('kind')}")
        else:
            kinds.append(str(part))
        if part == "end":
            end = chunk.end
    assert end is not None
    return kinds, end


def _anthropic_turn() -> pb.CompleteRequest:
    call_id = "toolu_01A09q90qw90lq917835lq9"
    return pb.CompleteRequest(
        model="claude-sonnet-4-5",
        max_tokens=256,
        temperature=0.0,
        tools=[
            pb.Tool(
                name="get_weather",
                description="Get the current weather in a given location",
                input_schema_json=json.dumps(WEATHER_SCHEMA),
                cache_control=ONE_HOUR,
            )
        ],
        system=[text(SYSTEM, ONE_HOUR)],
        messages=[
            user(text("What's the weather like in San Francisco?")),
            assistant(
                text("I'll check the weather in San Francisco."),
                pb.ContentBlock(
                    tool_use=pb.ToolUse(
                        id=call_id,
                        name="get_weather",
                        input_json='{"location": "San Francisco, CA"}',
                    )
                ),
            ),
            user(
                pb.ContentBlock(
                    tool_result=pb.ToolResult(tool_use_id=call_id, content="15 degrees, foggy"),
                    cache_control=pb.CacheControl(),
                ),
                text("Should I bring a jacket? Check Oakland too."),
            ),
        ],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
    )


def test_anthropic_agent_turn_sends_the_documented_body_streams_and_bills_the_report(
    providers: ProviderStack,
) -> None:
    server = providers.server
    server.script(
        "anthropic",
        Reply(
            events=anthropic_wire.stream(
                "claude-sonnet-4-5-20250929",
                ["Yes, ", "bring a light ", "jacket. ", "Checking Oakland."],
                anthropic_wire.Usage(
                    input_tokens=37, cache_creation_5m=12, cache_creation_1h=1486, output_tokens=18
                ),
                stop_reason="tool_use",
                tool=anthropic_wire.ToolCall(
                    "toolu_02Oakland", "get_weather", ['{"location":', ' "Oakland, CA"}']
                ),
            )
        ),
    )
    before = providers.stack.totals("tenant-b")
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-b"]) as client:
        kinds, end = _collect(client, _anthropic_turn())

    seen = server.seen_by("anthropic")[-1]
    # a temperature: sent under the API version that takes it (the SDK's, 2026-10-21, does not)
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.key == providers.keys["anthropic-1"]
    assert seen.body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "system": [
            {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Get the current weather in a given location",
                "input_schema": WEATHER_SCHEMA,
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            }
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "What's the weather like in San Francisco?"}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "I'll check the weather in San Francisco."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "name": "get_weather",
                        "input": {"location": "San Francisco, CA"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                        "content": "15 degrees, foggy",
                        "cache_control": {"type": "ephemeral"},
                    },
                    {"type": "text", "text": "Should I bring a jacket? Check Oakland too."},
                ],
            },
        ],
        "temperature": 0.0,
        "stream": True,
    }
    # streamed as the provider streamed: four text deltas, then the finished tool call
    assert kinds == ["start", *["delta:text"] * 4, "delta:tool_use", "end"]
    assert end.content[0].text == "Yes, bring a light jacket. Checking Oakland."
    assert end.content[1].tool_use == pb.ToolUse(
        id="toolu_02Oakland", name="get_weather", input_json='{"location": "Oakland, CA"}'
    )
    assert end.stop_reason == "tool_use"
    # the provider's usage is the bill: claude-sonnet-4-5 at $3 in, $3.75 5m write, $6 1h
    # write, $15 out per MTok = 3000 / 3750 / 6000 / 15000 nanos a token
    assert end.usage == pb.Usage(
        input_tokens=37,
        cache_creation_input_tokens=1498,
        output_tokens=18,
        cache_creation=pb.CacheCreation(
            ephemeral_5m_input_tokens=12, ephemeral_1h_input_tokens=1486
        ),
    )
    assert end.cost.cost_nanos == 37 * 3000 + 12 * 3750 + 1486 * 6000 + 18 * 15000 == 9_342_000
    assert end.cost.baseline_nanos == (37 + 1498) * 3000 + 18 * 15000 == 4_875_000
    assert end.cost.saved_nanos == 4_875_000 - 9_342_000
    assert not end.cost.estimated
    assert end.served_by == pb.LAYER_MODEL

    root, chats = router_spans(providers.stack, end.trace_id)
    assert root.attributes["cachemesh.served_by"] == "LAYER_MODEL"
    assert root.attributes["cachemesh.backend"] == "anthropic"
    assert root.attributes["cachemesh.usage_reported"] is True
    assert root.attributes["cachemesh.ttft_ms"] > 0
    assert chats[-1].attributes["gen_ai.provider.name"] == "anthropic"
    drift = root.attributes["cachemesh.drift.prompt_tokens"]
    after = providers.stack.totals("tenant-b")
    assert after.reconciled_requests == before.reconciled_requests + 1
    assert after.drift.prompt_tokens - before.drift.prompt_tokens == drift
    assert after.cost_nanos - before.cost_nanos == 9_342_000


def test_openai_agent_turn_sends_the_documented_body_streams_and_bills_the_report(
    providers: ProviderStack,
) -> None:
    server = providers.server
    server.script(
        "openai",
        Reply(
            events=openai_wire.stream(
                "gpt-4.1-2025-04-14",
                ["Let me ", "check tomorrow."],
                openai_wire.usage(prompt=2006, cached=1920, completion=31),
                finish="tool_calls",
                tool=(
                    "call_def456",
                    "get_current_weather",
                    ['{"location":', ' "Boston, MA",', ' "when": "tomorrow"}'],
                ),
            )
        ),
    )
    request = pb.CompleteRequest(
        model="gpt-4-1",
        max_tokens=256,
        tools=[
            pb.Tool(
                name="get_current_weather",
                description="Get the current weather in a given location",
                input_schema_json=json.dumps(WEATHER_SCHEMA),
            )
        ],
        system=[text(SYSTEM)],
        messages=[
            user(text("What's the weather like in Boston today?")),
            assistant(
                pb.ContentBlock(
                    tool_use=pb.ToolUse(
                        id="call_abc123",
                        name="get_current_weather",
                        input_json='{"location": "Boston, MA"}',
                    )
                )
            ),
            user(
                pb.ContentBlock(
                    tool_result=pb.ToolResult(tool_use_id="call_abc123", content="22 degrees")
                ),
                text("And tomorrow?"),
            ),
        ],
        cache=pb.CacheOptions(
            semantic=pb.SEMANTIC_MODE_BYPASS, prompt_cache_key="agent-weather-v1"
        ),
    )
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        kinds, end = _collect(client, request)

    seen = server.seen_by("openai")[-1]
    assert seen.headers["authorization"] == f"Bearer {seen.key}"
    assert seen.body == {
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What's the weather like in Boston today?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{"location": "Boston, MA"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc123", "content": "22 degrees"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_current_weather",
                    "description": "Get the current weather in a given location",
                    "parameters": WEATHER_SCHEMA,
                },
            }
        ],
        "max_completion_tokens": 256,
        # the tenant's own key (services/model/providers/cache_key.py), not the caller's
        "prompt_cache_key": hashlib.sha256(b"tenant-a\0agent-weather-v1").hexdigest(),
        "prompt_cache_retention": "in_memory",  # the row's policy, not OpenAI's default
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert kinds == ["start", "delta:text", "delta:text", "delta:tool_use", "end"]
    assert end.content[1].tool_use.input_json == '{"location": "Boston, MA", "when": "tomorrow"}'
    assert end.stop_reason == "tool_use"
    # gpt-4.1: $2 in, $0.50 cached in, $8 out per MTok; prompt_tokens include the cached ones
    assert end.usage == pb.Usage(input_tokens=86, cache_read_input_tokens=1920, output_tokens=31)
    assert end.cost.cost_nanos == 86 * 2000 + 1920 * 500 + 31 * 8000 == 1_380_000
    assert end.cost.baseline_nanos == 2006 * 2000 + 31 * 8000 == 4_260_000
    assert end.served_by == pb.LAYER_PREFIX_CACHE  # the provider reported a cache read
    root, _ = router_spans(providers.stack, end.trace_id)
    assert root.attributes["cachemesh.backend"] == "openai"
    assert root.attributes["cachemesh.served_by"] == "LAYER_PREFIX_CACHE"
    assert "cachemesh.drift.cache_read_input_tokens" in root.attributes


def test_an_l1_hit_on_a_provider_answer_costs_nothing(providers: ProviderStack) -> None:
    question = f"In one sentence, what is the capital of France? (ticket {uuid.uuid4().hex[:8]})"
    request = ask("gpt-4o-mini", question)
    request.cache.semantic = pb.SEMANTIC_MODE_USE
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        first = client.complete(request)
        second = client.complete(request)
    calls = [s for s in providers.server.seen_by("openai") if question in json.dumps(s.body)]
    assert len(calls) == 1  # the second answer came from L1, not from the provider
    assert first.served_by == pb.LAYER_MODEL and first.cost.cost_nanos > 0
    assert second.served_by == pb.LAYER_SEMANTIC_CACHE
    assert second.cost.cost_nanos == 0 and second.cost.saved_nanos == second.cost.baseline_nanos
    assert second.content == first.content
    root, _ = router_spans(providers.stack, first.trace_id)
    assert root.attributes["cachemesh.backend"] == "openai"
