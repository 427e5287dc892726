"""A usage figure a provider (or an OpenAI-compatible engine, or a proxy in front of one)
reports that no call can have: negative, not a whole number, or past any count a request of
the row can reach (ten times its context window plus its output cap, and never past
MAX_TOKENS, which keeps a bill under 2**53 nano-dollars). Before, a negative output count
was billed 0, a negative cache-write split went on to prefix-cache (which refused the bill),
a count past int64 failed the call after its answer was streamed, and 10**12 prompt tokens
were billed as reported. Now such a figure is not believed: the call is billed as if the
provider had not reported it (Plan's count of the prompt, the replica's own count of the
output), the end names the fields (``distrusted_usage``), the replica counts them
(``cachemesh_model_provider_usage_distrusted_total``) and logs one line without the value's
text. Real SDKs against the loopback wire server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.metrics import new_registry
from services.model.metrics import ModelMetrics
from services.model.providers.api import ProviderApi
from services.prefix_cache.pricing import cost_nanos
from services.prefix_cache.reconcile import reported_usage
from tests.integration.test_provider_streams import CLAUDE, GPT, TABLE, _api, loopback_providers
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply, WireServer

PLANNED = 40  # Plan's count of the prompt, on the request: the bill's prompt when distrusted
WORDS = ["Paris ", "is the ", "capital."]


def _most(model: str) -> int:
    spec = TABLE.models[model]
    return 10 * (spec.context_window_tokens + spec.max_output_tokens)


# a figure no call can have: negative, fractional, text, past the row's reach, past int64
GARBAGE: list[Any] = [-5, 12.5, "lots", _most(CLAUDE) + 1, 2**41, 10**30]
IDS = ["negative", "fraction", "text", "past-row", "past-2^40", "past-int64"]


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from loopback_providers()


def _run(api: ProviderApi, model: str) -> list[model_pb2.GenerateChunk]:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital of France?")])
    request = model_pb2.GenerateRequest(
        tenant="t",
        model=model,
        request=pb.CompleteRequest(model=model, max_tokens=16, messages=[question]),
    )
    request.prompt.prompt_tokens = PLANNED

    async def run() -> list[model_pb2.GenerateChunk]:
        try:
            return [chunk async for chunk in api.generate(request, 5.0)]
        finally:
            await api.close()

    return asyncio.run(run())


def _end(chunks: list[model_pb2.GenerateChunk]) -> model_pb2.GenerateEnd:
    (end,) = [c.end for c in chunks if c.WhichOneof("part") == "end"]
    return end


def _anthropic(server: WireServer, usage: anthropic_wire.Usage) -> model_pb2.GenerateEnd:
    server.script("anthropic", Reply(events=anthropic_wire.stream(CLAUDE, WORDS, usage)))
    return _end(_run(_api(server, "anthropic"), CLAUDE))


def _report(prompt: Any, cached: Any, completion: Any) -> dict[str, Any]:
    """OpenAI's usage object with these figures, its total their sum where they are numbers."""
    report = openai_wire.usage(0, 0, 0)
    report["prompt_tokens"], report["completion_tokens"] = prompt, completion
    report["prompt_tokens_details"]["cached_tokens"] = cached
    numbers = all(isinstance(n, (int, float)) for n in (prompt, completion))
    report["total_tokens"] = prompt + completion if numbers else 0
    return report


def _openai(server: WireServer, report: dict[str, Any]) -> model_pb2.GenerateEnd:
    server.script("openai", Reply(events=openai_wire.stream(GPT, WORDS, report)))
    return _end(_run(_api(server, "openai"), GPT))


def _billable(end: model_pb2.GenerateEnd, model: str) -> int:
    """prefix-cache takes the report (no BadUsage) and the bill is exact in a Lua double."""
    spec = TABLE.models[model]
    billed = reported_usage(end.provider_usage, spec)
    nanos = cost_nanos(billed.split, end.output_tokens, spec)
    assert 0 <= nanos < 2**53
    return nanos


@pytest.mark.parametrize("figure", GARBAGE, ids=IDS)
def test_an_anthropic_prompt_count_no_call_has_is_billed_as_planned(
    server: WireServer, figure: Any
) -> None:
    unreported = _anthropic(server, anthropic_wire.Usage(input_tokens=None, output_tokens=3))  # type: ignore[arg-type]
    end = _anthropic(server, anthropic_wire.Usage(input_tokens=figure, output_tokens=3))
    usage = end.provider_usage.anthropic
    assert usage.input_tokens == PLANNED == unreported.provider_usage.anthropic.input_tokens
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)
    assert end.output_tokens == usage.output_tokens == 3  # the output's count is believed
    assert list(end.distrusted_usage) == ["input_tokens"]
    assert not unreported.distrusted_usage  # a count not reported is the usual case
    assert _billable(end, CLAUDE) == _billable(unreported, CLAUDE)


@pytest.mark.parametrize("figure", [-1, 2**41], ids=["negative", "past-2^40"])
def test_an_anthropic_cache_write_split_no_call_has_drops_the_prompts_report(
    server: WireServer, figure: int
) -> None:
    """A split that sums wrong was refused by prefix-cache (BadUsage: the bill lost)."""
    usage = anthropic_wire.Usage(input_tokens=12, cache_creation_5m=figure, output_tokens=3)
    end = _anthropic(server, usage)
    report = end.provider_usage.anthropic
    assert (report.input_tokens, report.cache_creation_input_tokens) == (PLANNED, 0)
    assert report.cache_creation.ephemeral_5m_input_tokens == 0
    assert set(end.distrusted_usage) == {
        "cache_creation_input_tokens",
        "cache_creation.ephemeral_5m_input_tokens",
    }
    _billable(end, CLAUDE)


@pytest.mark.parametrize("figure", GARBAGE, ids=IDS)
def test_an_anthropic_output_count_no_call_has_is_the_replicas_count(
    server: WireServer, figure: Any
) -> None:
    unreported = _anthropic(server, anthropic_wire.Usage(input_tokens=12, output_tokens=None))  # type: ignore[arg-type]
    end = _anthropic(server, anthropic_wire.Usage(input_tokens=12, output_tokens=figure))
    assert unreported.output_tokens > 0
    assert end.output_tokens == end.provider_usage.anthropic.output_tokens
    assert end.output_tokens == unreported.output_tokens  # the replica's count of WORDS
    assert end.provider_usage.anthropic.input_tokens == 12  # the prompt's is believed
    assert list(end.distrusted_usage) == ["output_tokens"]
    assert _billable(end, CLAUDE) == _billable(unreported, CLAUDE)


@pytest.mark.parametrize("figure", GARBAGE, ids=IDS)
def test_an_openai_prompt_count_no_call_has_is_billed_as_planned(
    server: WireServer, figure: Any
) -> None:
    end = _openai(server, _report(figure, 0, 3))
    usage = end.provider_usage.openai
    assert (usage.prompt_tokens, usage.completion_tokens) == (PLANNED, 3)
    assert usage.total_tokens == PLANNED + 3
    assert "prompt_tokens" in end.distrusted_usage
    _billable(end, GPT)


@pytest.mark.parametrize("figure", GARBAGE, ids=IDS)
def test_an_openai_output_count_no_call_has_is_the_replicas_count(
    server: WireServer, figure: Any
) -> None:
    unreported = _openai(server, {**openai_wire.usage(2006, 0, 0), "completion_tokens": None})
    end = _openai(server, _report(2006, 1920, figure))
    usage = end.provider_usage.openai
    assert unreported.output_tokens > 0
    assert end.output_tokens == usage.completion_tokens == unreported.output_tokens
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (2006, 1920)
    assert usage.total_tokens == 2006 + end.output_tokens
    assert "completion_tokens" in end.distrusted_usage
    _billable(end, GPT)


def test_a_cached_count_past_the_prompt_drops_the_prompts_report(server: WireServer) -> None:
    end = _openai(server, openai_wire.usage(2006, -1920, 3))
    usage = end.provider_usage.openai
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (PLANNED, 0)
    assert list(end.distrusted_usage) == ["prompt_tokens_details.cached_tokens"]


def test_a_distrusted_figure_is_counted_and_logged_without_its_text(
    server: WireServer, caplog: pytest.LogCaptureFixture
) -> None:
    secretish = "sk-ant-" + "x" * 40  # a proxy echoing anything: never in a line
    registry = new_registry()
    metrics = ModelMetrics(registry, [CLAUDE], lambda: 0.0)
    server.script(
        "anthropic",
        Reply(
            events=anthropic_wire.stream(
                CLAUDE,
                WORDS,
                anthropic_wire.Usage(input_tokens=secretish, output_tokens=-2),  # type: ignore[arg-type]
            )
        ),
    )
    call = metrics.begin(CLAUDE)
    with caplog.at_level(logging.WARNING, logger="cachemesh.model"):
        for chunk in _run(_api(server, "anthropic"), CLAUDE):
            metrics.chunk(call, chunk)
    metrics.end(call, "ok")
    for field in ("input_tokens", "output_tokens"):
        labels = {"model": CLAUDE, "field": field}
        value = registry.get_sample_value("cachemesh_model_provider_usage_distrusted_total", labels)
        assert value == 1, field
    lines = [r.getMessage() for r in caplog.records if "usage" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "input_tokens" in lines[0] and "output_tokens" in lines[0] and CLAUDE in lines[0]
    assert "sk-ant" not in caplog.text and "x" * 40 not in caplog.text
