"""An upstream that ignores ``max_tokens`` (a misbehaving engine or proxy) and writes on: the
replica's own count of what the model wrote, which bills an answer cut mid-way (and one whose
provider reports no usage), is at most the request's ``max_tokens``, as a provider stops and
bills there. Before, max_tokens=50 and 6 MB written until the deadline billed 213,740 output
tokens (128,245,800 nanos on gpt-4o-mini, where 50 tokens cost 30,000): the tenant paid what
no provider bills, far past the limits' hold (max_tokens at the output price). The adapter
and its driver in process against the loopback provider server, as test_provider_streams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cachemesh.v1 import model_pb2
from tests.integration.test_provider_streams import CLAUDE, GPT, _api, _ends, _generate
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.wire_server import Reply, WireServer

MAX_TOKENS = 16  # ``_generate``'s
LONG = ["Paris is the capital of France and a city of many words. "] * 400  # ~5,000 tokens


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving("sk-****")


def _progress_counts(chunks: list[model_pb2.GenerateChunk]) -> list[int]:
    return [c.progress.output_tokens for c in chunks if c.WhichOneof("part") == "progress"]


def test_an_openai_answer_cut_past_max_tokens_is_billed_max_tokens(server: WireServer) -> None:
    events = openai_wire.stream(GPT, LONG, openai_wire.usage(20, 0, 9), cut_after=len(LONG) - 1)
    server.script("openai", Reply(events=events, cut=True))
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    assert end.interrupted
    assert end.output_tokens == MAX_TOKENS  # was 4,788


def test_an_anthropic_answer_cut_past_max_tokens_is_billed_max_tokens(server: WireServer) -> None:
    events = anthropic_wire.stream(CLAUDE, LONG, anthropic_wire.Usage(25, output_tokens=9))
    server.script("anthropic", Reply(events=events[: len(LONG)], cut=True))
    (end,) = _ends(_generate(_api(server, "anthropic"), CLAUDE))
    assert end.interrupted
    assert end.output_tokens == end.provider_usage.anthropic.output_tokens == MAX_TOKENS
    assert end.provider_usage.anthropic.input_tokens == 25  # the prompt as reported


def test_an_answer_without_usage_past_max_tokens_is_billed_max_tokens(server: WireServer) -> None:
    events = openai_wire.stream(GPT, LONG, None)  # an engine without stream_options' usage
    server.script("openai", Reply(events=events))
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    assert not end.interrupted and not end.HasField("provider_usage")
    assert end.output_tokens == MAX_TOKENS


def test_the_running_count_of_a_long_tool_call_stops_at_max_tokens(server: WireServer) -> None:
    pieces = ['{"city": "', *(["Paris " * 40] * 30), '"}']
    events = openai_wire.stream(GPT, [], None, tool=("call_1", "weather", pieces), cut_after=None)
    server.script("openai", Reply(events=events[:-3], cut=True))  # cut before its finish
    chunks = _generate(_api(server, "openai"), GPT)
    counts = _progress_counts(chunks)
    assert counts and max(counts) == MAX_TOKENS  # what the router bills a call it cuts
    (end,) = _ends(chunks)
    assert end.interrupted and end.output_tokens == MAX_TOKENS
