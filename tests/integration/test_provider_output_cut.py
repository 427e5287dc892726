"""What a provider replica bills, and where it stops an upstream that writes on past the
request's ``max_tokens``. A provider's reported usage is its bill, believed up to the row's
reach: DeepSeek's deepseek-reasoner (R1) and SiliconFlow's reasoning endpoints bound only the
final answer by max_tokens, the chain of thought outside it and billed as output (capping the
report at max_tokens billed 16 of R1's 405 tokens, 15,600 nanos for 249,000). An upstream
that ignores max_tokens (a misbehaving engine or proxy) is cut at its source instead: once its
visible output (text, tool calls; not thinking) passes ``cut_at(max_tokens)`` by our count,
the replica closes the upstream's stream and ends the answer ``max_tokens``, billed what it
wrote (before the cut, max_tokens=50 and 6 MB written until the deadline billed 213,740 output
tokens). An answer within max_tokens is untouched. The adapter and its driver in process
against the loopback provider server, as test_provider_streams."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cachemesh.v1 import model_pb2
from services.model.providers.output_cut import cut_at
from tests.integration.test_provider_streams import CLAUDE, GPT, _api, _ends, _generate
from tests.integration.test_provider_usage_distrusted import _billable
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.wire_server import Reply, WireServer

MAX_TOKENS = 50
LIMIT = cut_at(MAX_TOKENS)  # 114
SENTENCE = "Paris is the capital of France and a city of many words. "  # 12-13 tokens
ENDLESS = [SENTENCE] * 3000  # ~38,000 tokens, 6 s at the server's 2 ms an event


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving("sk-****")


def _text(chunks: list[model_pb2.GenerateChunk]) -> str:
    return "".join(c.text for c in chunks if c.WhichOneof("part") == "text")


def _stopped(server: WireServer, api: str, events: int) -> int:
    """The events the server wrote of ``events``, once it stopped writing (the connection
    closed), at most 2 s after the call."""
    (seen,) = server.seen_by(api)
    deadline = time.monotonic() + 2
    while True:
        sent = seen.sent
        time.sleep(0.1)
        if seen.sent == sent or time.monotonic() > deadline:
            assert sent < events, "the upstream wrote its whole stream: it was never cut"
            return sent


# --- a provider's report is its bill --------------------------------------------------------

THINKING = tuple(f"step {i} of my careful reasoning about the capital; " for i in range(40))


def test_a_deepseek_r1_chain_of_thought_past_max_tokens_is_billed_as_reported(
    server: WireServer,
) -> None:
    # deepseek-reasoner: 400 tokens of reasoning_content and a 5-token answer at max_tokens=16,
    # completion_tokens 405 (as the review's test_deepseek_cot.py); thinking is never cut
    report = openai_wire.usage(40, 0, 405, reasoning=400)
    events = openai_wire.stream(GPT, ["Paris ", "is it."], report, reasoning=THINKING)
    server.script("openai", Reply(events=events))
    chunks = _generate(_api(server, "openai"), GPT, 16)
    (end,) = _ends(chunks)
    assert _text(chunks) == "Paris is it."
    assert end.stop_reason == "end_turn" and not end.interrupted
    usage = end.provider_usage.openai
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (405, 400)
    assert end.output_tokens == 405 and not end.distrusted_usage  # was 16
    assert _billable(end, GPT) == 40 * 150 + 405 * 600 == 249_000  # was 15,600


# --- an upstream writing on past max_tokens is cut --------------------------------------------


def test_an_openai_upstream_ignoring_max_tokens_is_cut_and_billed_what_it_wrote(
    server: WireServer,
) -> None:
    server.reset()
    events = openai_wire.stream(GPT, ENDLESS, openai_wire.usage(20, 0, MAX_TOKENS))
    server.script("openai", Reply(events=events))
    started = time.monotonic()
    chunks = _generate(_api(server, "openai"), GPT, MAX_TOKENS)
    took = time.monotonic() - started
    (end,) = _ends(chunks)
    assert end.stop_reason == "max_tokens" and not end.interrupted and not end.error
    assert not end.HasField("provider_usage")  # its usage chunk was never reached
    # our count of what it wrote: past the cut by at most the last piece
    assert LIMIT < end.output_tokens <= LIMIT + 13
    assert _text(chunks).startswith(SENTENCE * 8)
    sent = _stopped(server, "openai", len(events))
    print(f"\ncut after {sent} of {len(events)} events, {took:.2f} s: {end.output_tokens} tokens")
    assert sent < 100 and took < 3


def test_an_anthropic_upstream_ignoring_max_tokens_is_cut_with_its_reported_prompt(
    server: WireServer,
) -> None:
    server.reset()
    events = anthropic_wire.stream(CLAUDE, ENDLESS, anthropic_wire.Usage(25, output_tokens=50))
    server.script("anthropic", Reply(events=events))
    chunks = _generate(_api(server, "anthropic"), CLAUDE, MAX_TOKENS)
    (end,) = _ends(chunks)
    assert end.stop_reason == "max_tokens" and not end.interrupted
    usage = end.provider_usage.anthropic
    assert usage.input_tokens == 25  # message_start's report: the prompt as billed
    assert usage.output_tokens == end.output_tokens and LIMIT < end.output_tokens <= LIMIT + 13
    assert _stopped(server, "anthropic", len(events)) < 100


def test_a_tool_call_written_on_past_max_tokens_is_cut(server: WireServer) -> None:
    server.reset()
    pieces = ['{"city": "', *(["Paris " * 40] * 300), '"}']
    events = openai_wire.stream(GPT, [], None, tool=("call_1", "weather", pieces))
    server.script("openai", Reply(events=events))
    chunks = _generate(_api(server, "openai"), GPT, MAX_TOKENS)
    (end,) = _ends(chunks)
    assert end.stop_reason == "max_tokens" and not end.interrupted
    assert LIMIT < end.output_tokens <= LIMIT + 41  # the last piece: 40 tokens
    assert _stopped(server, "openai", len(events)) < 100


def test_thinking_past_max_tokens_is_not_cut(server: WireServer) -> None:
    """An engine without usage (llama-server serving a reasoning model): thinking far past
    max_tokens, then a short answer: all of it arrives and is billed by our count."""
    server.reset()
    thinking = tuple([SENTENCE * 10] * 20)  # ~2,500 tokens of thinking
    events = openai_wire.stream(GPT, ["Paris."], None, reasoning=thinking)
    server.script("openai", Reply(events=events))
    chunks = _generate(_api(server, "openai"), GPT, 16)
    (end,) = _ends(chunks)
    assert end.stop_reason == "end_turn" and _text(chunks) == "Paris."
    assert end.output_tokens > 2000


# --- an answer within max_tokens is untouched ---------------------------------------------------

# 50 tokens by the provider's count, more by ours (up to the margin): never cut
WITHIN = ["Paris, "] * 30 + ["naturally."]


@pytest.mark.parametrize(
    ("backend", "model", "finish"),
    [("anthropic", CLAUDE, "max_tokens"), ("openai", GPT, "length"), ("llama", GPT, "length")],
)
def test_an_answer_of_max_tokens_is_untouched(
    server: WireServer, backend: str, model: str, finish: str
) -> None:
    server.reset()
    if backend == "anthropic":
        usage = anthropic_wire.Usage(25, output_tokens=MAX_TOKENS)
        events = anthropic_wire.stream(CLAUDE, WITHIN, usage, stop_reason=finish)
        api = "anthropic"
    else:  # llama-server: OpenAI's wire, no usage chunk without stream_options
        report = openai_wire.usage(20, 0, MAX_TOKENS) if backend == "openai" else None
        events = openai_wire.stream(GPT, WITHIN, report, finish=finish)
        api = "openai"
    server.script(api, Reply(events=events))
    chunks = _generate(_api(server, api), model, MAX_TOKENS)
    (end,) = _ends(chunks)
    assert _text(chunks) == "".join(WITHIN)
    assert end.stop_reason == "max_tokens" and not end.interrupted
    if backend == "llama":
        assert not end.HasField("provider_usage") and MAX_TOKENS <= end.output_tokens <= LIMIT
    else:
        assert end.output_tokens == MAX_TOKENS  # the provider's report
    (seen,) = server.seen_by(api)
    assert seen.sent == len(events)  # read to its end
