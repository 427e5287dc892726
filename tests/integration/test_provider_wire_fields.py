"""Fields of the providers' wire formats that change what an agent's model sees or what a call
costs, read and written by the adapters through the real SDKs against the loopback server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.tokens import load_tokenizers
from services.prefix_cache.pricing import cost_nanos
from services.prefix_cache.reconcile import reported_usage
from services.prefix_cache.rules import Split
from tests.integration.test_provider_streams import (
    CLAUDE,
    GPT,
    TABLE,
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


def _deepseek(hit: int, miss: int, completion: int, **extra: Any) -> dict[str, Any]:
    """DeepSeek's usage (https://api-docs.deepseek.com/guides/kv_cache): prompt_tokens =
    prompt_cache_hit_tokens + prompt_cache_miss_tokens, no ``prompt_tokens_details``."""
    return {
        "prompt_tokens": hit + miss,
        "completion_tokens": completion,
        "total_tokens": hit + miss + completion,
        "prompt_cache_hit_tokens": hit,
        "prompt_cache_miss_tokens": miss,
        **extra,
    }


@pytest.mark.parametrize(
    ("report", "cached"),
    [
        (_deepseek(1920, 86, 31), 1920),  # DeepSeek's own fields only
        (_deepseek(0, 2006, 31), 0),  # a miss
        # both reported (the standard field is preferred; never summed)
        (_deepseek(1920, 86, 31, prompt_tokens_details={"cached_tokens": 1920}), 1920),
        (_deepseek(1920, 86, 31, prompt_tokens_details={"cached_tokens": 1024}), 1024),
        (openai_wire.usage(2006, 1920, 31), 1920),  # OpenAI's
    ],
    ids=["deepseek-hit", "deepseek-miss", "both-equal", "both-differ", "openai"],
)
def test_a_deepseek_cache_hit_is_reported_and_billed_as_cached(
    server: WireServer, report: dict[str, Any], cached: int
) -> None:
    server.script("openai", Reply(events=openai_wire.stream(GPT, ["Paris."], report)))
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    usage = end.provider_usage.openai
    assert (usage.prompt_tokens, usage.completion_tokens) == (2006, 31)
    assert usage.prompt_tokens_details.cached_tokens == cached
    # the bill reconciled from that report: gpt-4o-mini at $0.15 in, $0.075 cached in, $0.6
    # out per MTok (a DeepSeek hit of 1920: 175,500 nanos, not 319,500)
    spec = TABLE.models[GPT]
    billed = reported_usage(end.provider_usage, spec)
    assert billed.split == Split(2006 - cached, 0, 0, cached)
    assert cost_nanos(billed.split, 31, spec) == (2006 - cached) * 150 + cached * 75 + 31 * 600


def _tool_turn(model: str) -> model_pb2.GenerateRequest:
    """An agent's turn after two tool calls: one failed (is_error), one succeeded."""
    calls = [
        pb.ContentBlock(tool_use=pb.ToolUse(id=f"call_{n}", name="read_file", input_json=args))
        for n, args in enumerate(['{"path": "/etc/shadow"}', '{"path": "notes.md"}'])
    ]
    results = [
        pb.ContentBlock(
            tool_result=pb.ToolResult(
                tool_use_id="call_0", content="permission denied: /etc/shadow", is_error=True
            )
        ),
        pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="call_1", content="buy milk")),
    ]
    request = pb.CompleteRequest(
        model=model,
        max_tokens=16,
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Read both files.")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=calls),
            pb.Message(role=pb.ROLE_USER, content=results),
        ],
    )
    return model_pb2.GenerateRequest(tenant="t", model=model, request=request)


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_failed_tool_result_reaches_the_model_as_a_failure(
    server: WireServer, backend: str, model: str
) -> None:
    """Anthropic's tool_result has is_error; an OpenAI ``tool`` message has no such flag, so
    the failure is written into its content ("Error: " before the tool's text)."""
    api = _api(server, backend)

    async def run() -> list[model_pb2.GenerateChunk]:
        return [chunk async for chunk in api.generate(_tool_turn(model), 5.0)]

    (end,) = _ends(asyncio.run(run()))
    assert end.stop_reason == "end_turn"
    body = server.seen_by(backend)[-1].body
    if backend == "anthropic":
        assert body["messages"][-1]["content"] == [
            {
                "type": "tool_result",
                "tool_use_id": "call_0",
                "content": "permission denied: /etc/shadow",
                "is_error": True,
            },
            {"type": "tool_result", "tool_use_id": "call_1", "content": "buy milk"},
        ]
    else:
        assert body["messages"][-2:] == [
            {
                "role": "tool",
                "tool_call_id": "call_0",
                "content": "Error: permission denied: /etc/shadow",
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "buy milk"},
        ]


def _nulls(prompt: bool = False, completion: bool = False) -> dict[str, Any]:
    """OpenAI's usage of a 25-token prompt and a 7-token answer, with counts null (an
    OpenAI-compatible engine that leaves them out); total_tokens null with them."""
    report = openai_wire.usage(25, 0, 7)
    if prompt:
        report["prompt_tokens"] = report["total_tokens"] = None
    if completion:
        report["completion_tokens"] = report["total_tokens"] = None
    return report


PLANNED = 30  # the prompt's tokens as Plan counted them (the router's PromptFacts)
ANSWER = ["Paris is ", "the capital ", "of France."]


def _planned(model: str) -> model_pb2.GenerateRequest:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital of France?")])
    return model_pb2.GenerateRequest(
        tenant="t",
        model=model,
        request=pb.CompleteRequest(model=model, max_tokens=16, messages=[question]),
        prompt=PromptFacts(prompt_tokens=PLANNED),
    )


def _anthropic_unreported(input_null: bool, output_null: bool) -> list[Event]:
    """Claude's stream with message_start's ``input_tokens`` and/or message_delta's
    ``output_tokens`` null (an Anthropic-compatible engine, a proxy that drops them)."""
    events = anthropic_wire.stream(CLAUDE, ANSWER, anthropic_wire.Usage(25, output_tokens=7))
    for n, (name, data) in enumerate(events):
        body = json.loads(data)
        if name == "message_start" and input_null:
            body["message"]["usage"]["input_tokens"] = None
        elif name == "message_delta" and output_null:
            body["usage"]["output_tokens"] = None
        events[n] = (name, dumps(body))
    return events


def _anthropic_delta_input_zero() -> list[Event]:
    """message_delta's (cumulative) usage saying ``input_tokens: 0`` after message_start's
    25 (a proxy that fills the counts it does not have with 0)."""
    events = anthropic_wire.stream(CLAUDE, ANSWER, anthropic_wire.Usage(25, output_tokens=7))
    for n, (name, data) in enumerate(events):
        body = json.loads(data)
        if name == "message_delta":
            body["usage"]["input_tokens"] = 0
        events[n] = (name, dumps(body))
    return events


@pytest.mark.parametrize(
    ("backend", "events", "prompt", "output"),
    [
        ("openai", openai_wire.stream(GPT, ANSWER, _nulls(completion=True)), 25, None),
        ("openai", openai_wire.stream(GPT, ANSWER, _nulls(prompt=True)), PLANNED, 7),
        # Ollama's OpenAI endpoint: prompt_tokens 0 for a prompt it had cached
        ("openai", openai_wire.stream(GPT, ANSWER, openai_wire.usage(0, 0, 7)), PLANNED, 7),
        ("anthropic", _anthropic_unreported(input_null=True, output_null=False), PLANNED, 7),
        ("anthropic", _anthropic_unreported(input_null=False, output_null=True), 25, None),
        # cumulative counts never fall: before, the 0 replaced the 25 (Plan's 30 billed)
        ("anthropic", _anthropic_delta_input_zero(), 25, 7),
    ],
    ids=[
        "openai-completion-null",
        "openai-prompt-null",
        "openai-prompt-0",
        "anthropic-input-null",
        "anthropic-output-null",
        "anthropic-delta-input-0",
    ],
)
def test_a_count_the_provider_did_not_report_is_billed_as_counted_here(
    server: WireServer, backend: str, events: list[Event], prompt: int, output: int | None
) -> None:
    """A null (or, OpenAI's prompt_tokens, 0) count is not reported: that field is the count
    used when no usage comes (Plan's prompt, the adapter's count of the answer), the others
    the provider's. Before, it went on as 0: an output billed 0, or a prompt of 0 that
    prefix-cache refuses, and the answer went out unbilled."""
    model = CLAUDE if backend == "anthropic" else GPT
    server.script(backend, Reply(events=events))
    api = _api(server, backend)

    async def run() -> list[model_pb2.GenerateChunk]:
        return [chunk async for chunk in api.generate(_planned(model), 5.0)]

    (end,) = _ends(asyncio.run(run()))
    spec = TABLE.models[model]
    counted = load_tokenizers([spec]).for_spec(spec).count("".join(ANSWER))
    assert counted > 0
    billed = reported_usage(end.provider_usage, spec)  # prefix-cache takes it
    assert billed.split.prompt_tokens == prompt
    assert billed.output_tokens == end.output_tokens == (counted if output is None else output)


def test_a_stream_cut_after_a_usage_without_its_output_count_bills_what_was_written(
    server: WireServer,
) -> None:
    """An engine that sends its usage before the finish_reason, its completion_tokens null,
    and then breaks: the output is the adapter's count of what the model wrote. Before, the
    report's null went on as 0 output tokens."""
    events = openai_wire.stream(GPT, ANSWER, _nulls(completion=True))
    usage = next(e for e in events if '"usage":{' in str(e[1]) or '"usage": {' in str(e[1]))
    finish = next(e for e in events if '"finish_reason":"stop"' in str(e[1]).replace(" ", ""))
    cut = [e for e in events if e not in (usage, finish, (None, "[DONE]"))]
    server.script("openai", Reply(events=[*cut, usage], cut=True))
    api = _api(server, "openai")

    async def run() -> list[model_pb2.GenerateChunk]:
        return [chunk async for chunk in api.generate(_planned(GPT), 5.0)]

    (end,) = _ends(asyncio.run(run()))
    assert end.interrupted
    spec = TABLE.models[GPT]
    counted = load_tokenizers([spec]).for_spec(spec).count("".join(ANSWER))
    assert end.output_tokens == end.provider_usage.openai.completion_tokens == counted > 0
