"""An answer whose provider reported its usage without an output count (OpenAI's
``completion_tokens`` null or not believed, Anthropic's ``message_delta`` without
``output_tokens``) is billed the adapter's count of what the model wrote: the larger of our
tokenizer's count and its non-empty pieces (each piece a provider streams is at least one of its
tokens), as a cut, interrupted or wholly unreported answer is (``ProviderApi``). Before, those
two ends took our count alone: a JSON-mode whitespace runaway of 1,000 pieces of 32 spaces was
billed 250 output tokens (150,000 nanos on gpt-4o-mini; 3,750,000 on Claude Sonnet), not 1,000.
The real SDKs over loopback HTTP, no stack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from cachemesh.v1 import model_pb2
from services.common.models import load_model_table
from tests.integration.test_provider_streams import CLAUDE, GPT, _api, _ends, _generate
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.wire_server import Reply, WireServer, dumps

PIECES = 1_000
RUNAWAY = [" " * 32] * PIECES  # a JSON-mode whitespace runaway: our count, 250
TABLE = load_model_table()


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving("sk-****")


def _end(server: WireServer, backend: str, reply: Reply) -> model_pb2.GenerateEnd:
    server.reset()
    server.script(backend, reply)
    model = CLAUDE if backend == "anthropic" else GPT
    ends = _ends(_generate(_api(server, backend), model, 1024))
    assert len(ends) == 1
    return ends[0]


def _nanos(model: str, tokens: int) -> int:
    return tokens * TABLE.baseline_for(model).rates(0).output_nanos


@pytest.mark.parametrize("completion", [None, -1], ids=["null", "not-believed"])
def test_openai_usage_without_a_completion_count_bills_the_pieces(
    server: WireServer, completion: Any
) -> None:
    report = openai_wire.usage(20, 0, 0)
    report["completion_tokens"] = completion
    report["total_tokens"] = None
    end = _end(server, "openai", Reply(events=openai_wire.stream(GPT, RUNAWAY, report)))
    assert end.stop_reason == "end_turn"
    assert end.output_tokens == PIECES  # was 250
    assert end.provider_usage.openai.completion_tokens == PIECES
    assert end.provider_usage.openai.total_tokens == 20 + PIECES
    assert _nanos(GPT, end.output_tokens) == 600_000  # was 150,000


def test_anthropic_message_delta_without_output_tokens_bills_the_pieces(
    server: WireServer,
) -> None:
    events = []
    usage = anthropic_wire.Usage(25, output_tokens=3)
    for name, data in anthropic_wire.stream(CLAUDE, RUNAWAY, usage):
        if name == "message_delta":
            delta = json.loads(data)
            delta["usage"] = {"output_tokens": None}
            data = dumps(delta)
        events.append((name, data))
    end = _end(server, "anthropic", Reply(events=events))
    assert end.stop_reason == "end_turn"
    assert end.output_tokens == PIECES  # was 250
    assert end.provider_usage.anthropic.output_tokens == PIECES
    assert _nanos(CLAUDE, end.output_tokens) == 15_000_000  # was 3,750,000


def test_ordinary_text_is_billed_our_count_when_it_is_more(server: WireServer) -> None:
    """Few pieces of many tokens each: our count, not the pieces (3 pieces, 12 tokens)."""
    report = openai_wire.usage(20, 0, 0)
    report["completion_tokens"] = None
    texts = ["Paris is the capital", " and largest city of", " France, on the Seine."]
    end = _end(server, "openai", Reply(events=openai_wire.stream(GPT, texts, report)))
    assert end.output_tokens > len(texts)


def test_an_interrupted_end_tells_its_visible_pieces_not_its_thinking(server: WireServer) -> None:
    """An end the replica makes before its provider's (here the stream closed mid-answer)
    carries the answer's visible non-empty pieces, each at least one provider token, apart
    from its thinking: the router says an answer cut at its deadline "had written all of its
    max_tokens" only by them (``output_tokens`` holds the thinking, 40 pieces here)."""
    texts = ["Paris", " is", " the", " capital", "."]
    thinking = tuple(["Let me think. "] * 40)
    events = openai_wire.stream(GPT, texts, None, reasoning=thinking, cut_after=3)
    end = _end(server, "openai", Reply(events=events))
    assert end.interrupted
    assert end.visible_pieces == 3  # was not told: 0
    assert end.output_tokens >= 40 + 3
