"""A reasoning model's thinking, read by the real SDK over loopback HTTP (the adapter and its
driver, ``ProviderApi``, in process; no stack): an OpenAI-compatible engine's
``reasoning_content`` (llama-server, DeepSeek; vLLM's newer ``reasoning``) or Anthropic's
``thinking`` block. Each piece of it is a ``progress`` chunk (the router counts it as the
answer going on: a model thinking for long is not silent), the thinking itself goes nowhere,
and its tokens, which the provider bills, are counted in what a cut or unreported answer
produced; a finished answer's reported usage counts them already (OpenAI's completion_tokens,
Anthropic's output_tokens), so they are not added again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cachemesh.v1 import model_pb2
from services.common.tokens import load_tokenizers
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
from tests.providers.wire_server import Reply, WireServer

THINKING = "Let me weigh the quarter's figures before I answer. " * 60
PIECES = tuple(THINKING[i : i + 200] for i in range(0, len(THINKING), 200))
ANSWER = ["Revenue ", "grew."]


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from loopback_providers()


def _thinking_tokens(model: str) -> int:
    spec = TABLE.models[model]
    return load_tokenizers([spec]).for_spec(spec).count(THINKING)


def _kinds(chunks: list[model_pb2.GenerateChunk]) -> list[str]:
    return [str(c.WhichOneof("part")) for c in chunks]


@pytest.mark.parametrize(
    ("backend", "field"),
    [("anthropic", ""), ("openai", "reasoning_content"), ("openai", "reasoning")],
)
def test_thinking_goes_on_as_progress_and_nowhere_else(
    server: WireServer, backend: str, field: str
) -> None:
    if backend == "anthropic":
        model = CLAUDE
        usage = anthropic_wire.Usage(25, output_tokens=900)
        events = anthropic_wire.stream(CLAUDE, ANSWER, usage, thinking=PIECES)
        held = len(PIECES) + 1  # its pieces, then its signature
    else:
        model = GPT
        report = openai_wire.usage(30, 0, 900, reasoning=880)
        events = openai_wire.stream(GPT, ANSWER, report, reasoning=PIECES, reasoning_field=field)
        held = len(PIECES)
    server.script(backend, Reply(events=events))
    chunks = _generate(_api(server, backend), model)
    # the first piece of thinking is the first token (the prefill is done)
    assert _kinds(chunks) == ["start", *["progress"] * held, "text", "text", "end"]
    # each carries the running count of what the model wrote (its thinking), nothing else
    counts = _counts(chunks)
    assert counts == sorted(counts) and counts[-1] >= _thinking_tokens(model)
    assert "".join(c.text for c in chunks if c.WhichOneof("part") == "text") == "Revenue grew."
    (end,) = _ends(chunks)
    assert end.output_tokens == 900  # the provider's count, its thinking in it: not added again


def _counts(chunks: list[model_pb2.GenerateChunk]) -> list[int]:
    """The running counts the ``progress`` chunks carry."""
    return [c.progress.output_tokens for c in chunks if c.WhichOneof("part") == "progress"]


def _cut_in_the_thinking(backend: str) -> Reply:
    """The connection drops in the thinking, its last piece and the answer lost."""
    if backend == "anthropic":
        events = anthropic_wire.stream(CLAUDE, ANSWER, anthropic_wire.Usage(25), thinking=PIECES)
        # message_start, the thinking block's start, its pieces
        return Reply(events=events[: 2 + len(PIECES) - 1], cut=True)
    events = openai_wire.stream(GPT, ANSWER, None, reasoning=PIECES)
    return Reply(events=events[: 1 + len(PIECES) - 1], cut=True)  # the role chunk, the pieces


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_stream_cut_in_the_thinking_bills_the_thinking(
    server: WireServer, backend: str, model: str
) -> None:
    server.script(backend, _cut_in_the_thinking(backend))
    chunks = _generate(_api(server, backend), model)
    assert _kinds(chunks) == ["start", *["progress"] * (len(PIECES) - 1), "end"]
    (end,) = _ends(chunks)
    assert end.interrupted
    # all but the last 200 characters of the thinking were written (and are billed)
    assert end.output_tokens >= _thinking_tokens(model) * 0.8
    if backend == "anthropic":
        assert end.provider_usage.anthropic.output_tokens == end.output_tokens
    # a call the router cuts there, or whose caller leaves, gets no end: it is billed the
    # last progress's running count, the end's count of the same pieces (and the pieces since
    # its last whole count, at most an eighth of them, counted each alone: a little more)
    assert end.output_tokens <= _counts(chunks)[-1] <= end.output_tokens * 9 / 8


def test_an_engine_without_usage_counts_its_thinking(server: WireServer) -> None:
    # an OpenAI-compatible engine without stream_options support: no usage chunk
    server.script("openai", Reply(events=openai_wire.stream(GPT, ANSWER, None, reasoning=PIECES)))
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    assert not end.interrupted and not end.HasField("provider_usage")
    assert end.output_tokens > _thinking_tokens(GPT)  # its thinking and its answer


def test_anthropics_thinking_tokens_are_the_answers_reasoning_tokens(server: WireServer) -> None:
    """Anthropic reports, of output_tokens, the thinking's in message_delta's
    ``usage.output_tokens_details.thinking_tokens`` (the SDK 2.x's MessageDeltaUsage): the
    answer's reasoning_tokens, as OpenAI's completion_tokens_details.reasoning_tokens is.
    Before, the adapter did not read it: 0, "none reported", for a report of 880. Not
    reported: 0."""
    reported = anthropic_wire.Usage(25, output_tokens=900, thinking_tokens=880)
    unreported = anthropic_wire.Usage(25, output_tokens=900)
    for usage in (reported, unreported):
        events = anthropic_wire.stream(CLAUDE, ANSWER, usage, thinking=PIECES)
        server.script("anthropic", Reply(events=events))
    ends = [_ends(_generate(_api(server, "anthropic"), CLAUDE))[0] for _ in range(2)]
    assert [(e.output_tokens, e.reasoning_tokens) for e in ends] == [(900, 880), (900, 0)]
