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

import asyncio
import time
from collections.abc import Iterator

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.models import ModelSpec
from services.common.tokens import Tokenizer, Tokenizers, load_vocabulary
from services.model.providers.api import ProviderApi
from services.model.providers.output_cut import cut_at
from services.model.providers.usage_check import most_tokens
from tests.integration.test_provider_streams import (
    CLAUDE,
    GPT,
    TABLE,
    _api,
    _ends,
    _generate,
    _settings,
)
from tests.integration.test_provider_usage_distrusted import _billable
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica
from tests.providers.wire_server import Reply, WireServer

MAX_TOKENS = 50
LIMIT = cut_at(MAX_TOKENS, exact=True)  # 114: an OpenAI row, counted with its own vocabulary
WIDE = cut_at(MAX_TOKENS, exact=False)  # 264: Claude's and a self-hosted engine's are not ours
SELF_HOSTED = "llama-3-1-8b-vllm"  # counted with cl100k_base; its engine's tokenizer is Llama 3's
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
    chunks = _generate(_api(server, "openai"), GPT, MAX_TOKENS)
    (end,) = _ends(chunks)
    assert end.stop_reason == "max_tokens" and not end.interrupted and not end.error
    assert not end.HasField("provider_usage")  # its usage chunk was never reached
    # our count of what it wrote: past the cut by at most the counts' spacing (an eighth of
    # the cut, in bytes) and the last piece
    assert LIMIT < end.output_tokens <= LIMIT + LIMIT // 8 + 13
    assert _text(chunks).startswith(SENTENCE * 8)
    # cut at its source, by what the server wrote (not by real time: a loaded machine's clock
    # proves nothing): it stopped writing once the replica closed the stream, within the first
    # 100 of its 3,000 events
    sent = _stopped(server, "openai", len(events))
    print(f"\ncut after {sent} of {len(events)} events: {end.output_tokens} tokens")
    assert sent < 100


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
    # cl100k_base only estimates Claude's count: the wide margin
    assert usage.output_tokens == end.output_tokens
    assert WIDE < end.output_tokens <= WIDE + WIDE // 8 + 13
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


def test_thinking_past_max_tokens_is_not_cut_below_the_models_max_output_tokens(
    server: WireServer,
) -> None:
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


# --- a runaway of many bytes a token, and thinking forever ------------------------------------


class Counting(Tokenizer):
    """A vocabulary's tokenizer recording the length of each text it counts once (a streamed
    answer's counts: the cut's)."""

    def __init__(self, name: str) -> None:
        super().__init__(load_vocabulary(name)._encoding)
        self.counts: list[int] = []

    def count_once(self, text: str) -> int:
        self.counts.append(len(text))
        return super().count_once(text)


def _api_for(
    server: WireServer, spec: ModelSpec, tokenizer: Tokenizer | None = None
) -> ProviderApi:
    """An OpenAI-wire replica serving ``spec`` (a self-hosted row, or a row changed for the
    test), counting with ``tokenizer`` (else the row's own)."""
    counting = None if tokenizer is None else Tokenizers([tokenizer])
    return provider_replica(_settings(server, "openai", spec.id), [spec], tokenizer=counting)


def test_a_whitespace_runaway_is_cut_by_its_pieces_with_few_counts(server: WireServer) -> None:
    """A JSON-mode runaway of whitespace (32 spaces a delta, a few tokens in 32 bytes): cut
    once its deltas pass the cut (each at least one provider token), counted a few times.
    Before: counted whole at each delta past the first 1,280 bytes (6,000 deltas at
    max_tokens=1,024: 18.4 s of CPU, the event loop stalled up to 11.8 s, and the upstream
    wrote all 6,004 events)."""
    server.reset()
    events = openai_wire.stream(GPT, ['{"a": 1'] + [" " * 32] * 6000, None)
    server.script("openai", Reply(events=events))
    spec = TABLE.models[GPT]
    counting = Counting(spec.tokenizer)
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="JSON?")])
    request = model_pb2.GenerateRequest(
        tenant="t",
        model=GPT,
        request=pb.CompleteRequest(model=GPT, max_tokens=1024, messages=[question]),
    )

    async def run() -> list[model_pb2.GenerateChunk]:
        api = _api_for(server, spec, counting)
        return [chunk async for chunk in api.generate(request, 30.0)]

    chunks = asyncio.run(run())
    (end,) = _ends(chunks)
    sent = _stopped(server, "openai", len(events))
    limit = cut_at(1024, exact=True)  # 1,280
    counts = counting.counts
    print(f"\nwhitespace runaway: {sent} of {len(events)} events, {len(counts)} counts")
    assert end.stop_reason == "max_tokens" and not end.interrupted
    assert _text(chunks) == '{"a": 1' + " " * 32 * limit  # its 1,281st delta passed the cut
    assert sent < limit + 100  # was 6,004 of 6,004
    assert len(counts) <= 32  # the cut's counts, geometrically spaced; was ~4,700
    # billed its pieces, each at least one provider token, not our count of its spaces (325:
    # 195,000 nanos at gpt-4o-mini's 600 an output token)
    assert end.output_tokens == limit + 1 == 1281
    assert end.output_tokens * spec.rates(0).output_nanos == 768_600


ZH = (  # Chinese, with its full-width punctuation
    "巴黎是法国的首都，也是一座历史悠久的城市。它以埃菲尔铁塔、卢"  # noqa: RUF001
    "浮宫和塞纳河而闻名。每年有数百万游客来到这里参观博物馆、品尝"
    "美食并欣赏建筑。"
)
HI = (
    "पेरिस फ्रांस की राजधानी है और एक लंबे इत"
    "िहास वाला शहर है। यह एफिल टॉवर, लूव्र सं"
    "ग्रहालय और सीन नदी के लिए प्रसिद्ध है। ह"
    "र साल लाखों पर्यटक यहाँ आते हैं।"
)


@pytest.mark.parametrize("sentence", [ZH, HI], ids=["chinese", "hindi"])
def test_a_non_english_answer_within_max_tokens_on_a_self_hosted_row_is_not_cut(
    server: WireServer, sentence: str
) -> None:
    """A self-hosted engine's tokenizer denser than cl100k_base (o200k_base stands in for
    it: cl100k_base counts Chinese 1.68 times, Hindi 3.21 times as many tokens): an answer
    the engine ends within max_tokens=1,024 arrives whole, with its usage. Before (the
    narrow margin, 1,280): 798 engine tokens of Chinese counted 1,344 and cut."""
    server.reset()
    engine = load_vocabulary("o200k_base")
    pieces: list[str] = []
    while engine.count_once("".join(pieces) + sentence) <= 1024:
        pieces.append(sentence)
    text = "".join(pieces)
    ours = load_vocabulary("cl100k_base").count_once(text)
    assert ours > cut_at(1024, exact=True)  # past the narrow margin
    events = openai_wire.stream(
        SELF_HOSTED, pieces, openai_wire.usage(20, 0, engine.count_once(text)), finish="stop"
    )
    server.script("openai", Reply(events=events))
    chunks = _generate(_api_for(server, TABLE.models[SELF_HOSTED]), SELF_HOSTED, 1024)
    (end,) = _ends(chunks)
    print(f"\n{engine.count_once(text)} engine tokens, {ours} by cl100k_base: {end.stop_reason}")
    assert end.stop_reason == "end_turn" and _text(chunks) == text
    assert end.HasField("provider_usage")
    assert end.output_tokens == engine.count_once(text)
    (seen,) = server.seen_by("openai")
    assert seen.sent == len(events)


def test_a_runaway_on_a_self_hosted_row_is_still_cut(server: WireServer) -> None:
    server.reset()
    events = openai_wire.stream(SELF_HOSTED, ENDLESS, None)
    server.script("openai", Reply(events=events))
    chunks = _generate(_api_for(server, TABLE.models[SELF_HOSTED]), SELF_HOSTED, MAX_TOKENS)
    (end,) = _ends(chunks)
    assert end.stop_reason == "max_tokens" and not end.interrupted
    assert WIDE < end.output_tokens <= WIDE + WIDE // 8 + 13  # the wide margin: 264
    assert _stopped(server, "openai", len(events)) < 100


def test_thinking_past_the_models_max_output_tokens_is_cut(server: WireServer) -> None:
    """A model thinking forever (reasoning_content, no answer, no usage) at max_tokens=50:
    cut once its whole output, thinking included, passes cut_at(max_output_tokens), and
    billed what it wrote by then. Before: never cut, 24,212 output tokens billed in 5 s, past
    gpt-4o-mini's max_output_tokens (16,384), and on until the deadline (300 s)."""
    server.reset()
    thinking = tuple([SENTENCE * 20] * 300)  # ~250 tokens an event, ~75,000 in all
    events = openai_wire.stream(GPT, ["Paris."], None, reasoning=thinking)
    server.script("openai", Reply(events=events))
    chunks = _generate(_api(server, "openai"), GPT, MAX_TOKENS)
    (end,) = _ends(chunks)
    limit = cut_at(TABLE.models[GPT].max_output_tokens, exact=True)  # 20,480
    sent = _stopped(server, "openai", len(events))
    print(f"\nthinking runaway: {sent} of {len(events)} events, {end.output_tokens} tokens")
    assert end.stop_reason == "max_tokens" and not end.interrupted and _text(chunks) == ""
    # past it by less than the counts' spacing (an eighth of what was counted) and a delta
    assert limit < end.output_tokens <= limit + limit // 8 + 260
    assert sent < 150


def test_our_count_is_held_to_the_rows_reach(server: WireServer) -> None:
    """Our count of what an upstream wrote, billed when it reports no usage, is held to the
    row's reach (``most_tokens``) as a provider's report is: one delta of ~5,000 tokens on a
    row whose reach is 1,500 is billed 1,500."""
    server.reset()
    spec = TABLE.models[GPT].model_copy(
        update={"context_window_tokens": 100, "max_output_tokens": 50}
    )
    assert most_tokens(spec) == 1500
    events = openai_wire.stream(GPT, ["Paris " * 5000], None)
    server.script("openai", Reply(events=events))
    chunks = _generate(_api_for(server, spec), GPT, MAX_TOKENS)
    (end,) = _ends(chunks)
    assert end.stop_reason == "max_tokens"  # cut: past 114
    assert end.output_tokens == 1500  # was 5,000
