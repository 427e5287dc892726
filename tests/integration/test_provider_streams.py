"""A provider's stream that breaks, or ends, read by the real SDK over loopback HTTP: the adapter
and its driver (``ProviderApi``) in process against the loopback provider server, no stack.

A stream that ends without its final event was cut, however cleanly its connection closed: it
must never end as an answer (the router would store and serve a truncated one). A connection
lost before anything reached the caller is retried like any lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.tokens import load_tokenizers
from services.model.providers.api import ProviderApi
from services.model.providers.config import ProviderSettings
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import Reply, WireServer

CLAUDE, GPT = "claude-sonnet-4-5", "gpt-4o-mini"
TABLE = load_model_table()


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    """The providers on loopback (Anthropic and OpenAI wire formats), for this module."""
    yield from loopback_providers()


def loopback_providers() -> Iterator[WireServer]:
    yield from serving("sk-****")


def _settings(server: WireServer, backend: str, model: str) -> ProviderSettings:
    """The settings of a replica on ``server`` serving ``model`` through ``backend``."""
    return provider_settings(
        "anthropic" if backend == "anthropic" else "openai",
        server.base if backend == "anthropic" else server.base + "/v1",
        "sk-ant-test" if backend == "anthropic" else "sk-test",
        max_retries=2,
        backoff_s=0.01,
        backoff_max_s=0.02,
        upstream_ids={model: model},
    )


def _api(server: WireServer, backend: str) -> ProviderApi:
    model = CLAUDE if backend == "anthropic" else GPT
    # the SDK's adapter, the row's own vocabulary
    return provider_replica(_settings(server, backend, model), [model])


def _generate(api: ProviderApi, model: str, max_tokens: int = 16) -> list[model_pb2.GenerateChunk]:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital of France?")])
    request = model_pb2.GenerateRequest(
        tenant="t",
        model=model,
        request=pb.CompleteRequest(model=model, max_tokens=max_tokens, messages=[question]),
    )

    async def run() -> list[model_pb2.GenerateChunk]:
        return [chunk async for chunk in api.generate(request, 5.0)]

    return asyncio.run(run())


def _ends(chunks: list[model_pb2.GenerateChunk]) -> list[model_pb2.GenerateEnd]:
    return [c.end for c in chunks if c.WhichOneof("part") == "end"]


def _closed_mid_answer(backend: str) -> Reply:
    """A stream closed cleanly after two pieces of text: no stop event, no finish_reason."""
    texts = ["Paris", " is the", " capital."]
    if backend == "anthropic":
        events = anthropic_wire.stream(CLAUDE, texts, anthropic_wire.Usage(25, output_tokens=9))
        text_events = [e for e in events if e[0] not in ("message_delta", "message_stop")]
        return Reply(events=text_events[:-2])
    return Reply(events=openai_wire.stream(GPT, texts, None, cut_after=2))


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_stream_closed_before_its_final_event_is_interrupted(
    server: WireServer, backend: str, model: str
) -> None:
    server.script(backend, _closed_mid_answer(backend))
    (end,) = _ends(_generate(_api(server, backend), model))
    assert end.interrupted and end.stop_reason == "interrupted"
    assert "StreamCut" in end.error


def test_an_anthropic_connection_lost_before_the_first_block_is_retried(
    server: WireServer,
) -> None:
    """The anthropic SDK lets its HTTP stack's read error through unwrapped: still a lost
    connection, retried while nothing has reached the caller."""
    usage = anthropic_wire.Usage(25, output_tokens=2)
    started = anthropic_wire.stream(CLAUDE, ["Paris."], usage)[:1]  # message_start only
    server.script(
        "anthropic",
        Reply(events=started, cut=True),
        Reply(events=anthropic_wire.stream(CLAUDE, ["Paris."], usage)),
    )
    before = len(server.seen_by("anthropic"))
    chunks = _generate(_api(server, "anthropic"), CLAUDE)
    (end,) = _ends(chunks)
    assert end.stop_reason == "end_turn" and not end.interrupted
    assert len(server.seen_by("anthropic")) == before + 2


def test_a_stream_cut_before_anything_reached_the_caller_is_unavailable_after_retries(
    server: WireServer,
) -> None:
    """Nothing produced and every try cut: UNAVAILABLE (the router's next replica), not an
    empty answer."""
    usage = anthropic_wire.Usage(25, output_tokens=2)
    started = anthropic_wire.stream(CLAUDE, ["Paris."], usage)[:1]
    server.script("anthropic", *(Reply(events=started) for _ in range(3)))
    with pytest.raises(RequestError) as caught:
        _generate(_api(server, "anthropic"), CLAUDE)
    assert caught.value.code == Code.UNAVAILABLE


def _cut_after_final_event(backend: str) -> Reply:
    """The whole answer and its usage, then the connection lost: OpenAI's finish_reason and
    include_usage chunks came (1500 prompt tokens, 1024 of them cached, 7 out) but not
    [DONE]; Anthropic's message_delta (stop_reason, 7 out) came but not message_stop."""
    texts = ["Paris is ", "the capital."]
    if backend == "anthropic":
        usage = anthropic_wire.Usage(input_tokens=20, cache_read_input_tokens=4000, output_tokens=7)
        events = anthropic_wire.stream(CLAUDE, texts, usage)
        assert events[-1][0] == "message_stop"
    else:
        events = openai_wire.stream(GPT, texts, openai_wire.usage(1500, 1024, 7))
        assert events[-1] == (None, "[DONE]")
    return Reply(events=events[:-1], cut=True)


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_connection_lost_after_the_final_event_is_an_answer_billed_as_reported(
    server: WireServer, backend: str, model: str
) -> None:
    """Not interrupted (the router would rerun it on another replica: the tenant would pay
    the provider twice), and billed by the provider's report, its cache reads credited."""
    server.script(backend, _cut_after_final_event(backend))
    before = len(server.seen_by(backend))
    chunks = _generate(_api(server, backend), model)
    (end,) = _ends(chunks)
    assert not end.interrupted and end.stop_reason == "end_turn", end
    assert "".join(c.text for c in chunks if c.WhichOneof("part") == "text") == (
        "Paris is the capital."
    )
    assert end.output_tokens == 7
    if backend == "anthropic":
        assert end.provider_usage.anthropic.cache_read_input_tokens == 4000
    else:
        assert end.provider_usage.openai.prompt_tokens_details.cached_tokens == 1024
    assert len(server.seen_by(backend)) == before + 1  # not retried


def test_an_openai_connection_lost_before_the_usage_chunk_is_interrupted(
    server: WireServer,
) -> None:
    """finish_reason came but the usage chunk it asked for did not: the bill is not whole,
    the stream is broken as before (billed by the count of what was produced)."""
    events = openai_wire.stream(GPT, ["Paris."], openai_wire.usage(1500, 1024, 2))
    server.script("openai", Reply(events=events[:-2], cut=True))  # usage and [DONE] lost
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    assert end.interrupted and not end.HasField("provider_usage")


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("eos_token", "end_turn"),
        ("eos", "end_turn"),
        ("end", "end_turn"),
        ("abort", "max_tokens"),
        ("a_reason_no_one_documents", "max_tokens"),
    ],
)
def test_an_engines_own_finish_reason_is_a_contract_stop_reason(
    server: WireServer, finish: str, stop_reason: str
) -> None:
    """OpenAI-compatible engines' own reasons (TGI before 2.2.1 "eos_token", Together "eos")
    end the turn in the contract's words (end_turn | max_tokens | tool_use): an answer L1
    may store. vLLM's "abort" (an aborted request) and a reason no one documents may have cut
    the answer: max_tokens, never stored."""
    events = openai_wire.stream(GPT, ["Paris."], openai_wire.usage(30, 0, 2), finish=finish)
    server.script("openai", Reply(events=events))
    (end,) = _ends(_generate(_api(server, "openai"), GPT))
    assert end.stop_reason == stop_reason and not end.interrupted


def test_a_tool_call_finished_as_stop_is_tool_use(server: WireServer) -> None:
    """gpt-4o (streaming) and Ollama end a turn that called a tool with finish_reason "stop":
    an agent loop runs the tool when stop_reason is tool_use."""
    events = openai_wire.stream(
        GPT,
        [],
        openai_wire.usage(30, 0, 9),
        finish="stop",
        tool=("call_1", "get_weather", ['{"city":', '"Paris"}']),
    )
    server.script("openai", Reply(events=events))
    chunks = _generate(_api(server, "openai"), GPT)
    blocks = [c.block.tool_use for c in chunks if c.WhichOneof("part") == "block"]
    (end,) = _ends(chunks)
    assert [(b.name, b.input_json) for b in blocks] == [("get_weather", '{"city":"Paris"}')]
    assert end.stop_reason == "tool_use"


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_each_piece_of_a_tool_call_goes_on_as_progress_and_the_call_whole_after(
    server: WireServer, backend: str, model: str
) -> None:
    """The call's name and each piece of its arguments are a ``progress`` chunk, nothing in
    it but the running count of what the model wrote (the router counts it as the answer going
    on: a slow engine writing a long call is not silent; and bills a call it cuts that count);
    the call itself is one ``tool_use`` block once whole, as before."""
    pieces = ['{"city":', ' "Par', 'is"}']
    if backend == "anthropic":
        tool = anthropic_wire.ToolCall("toolu_01", "get_weather", pieces)
        events = anthropic_wire.stream(
            CLAUDE, ["Let me look."], anthropic_wire.Usage(25, output_tokens=20), tool=tool
        )
    else:
        events = openai_wire.stream(
            GPT,
            ["Let me look."],
            openai_wire.usage(30, 0, 20),
            finish="tool_calls",
            tool=("call_1", "get_weather", pieces),
        )
    server.script(backend, Reply(events=events))
    chunks = _generate(_api(server, backend), model)
    kinds = [c.WhichOneof("part") for c in chunks]
    assert kinds == ["start", "text", *["progress"] * (1 + len(pieces)), "block", "end"]
    spec = TABLE.models[model]
    count = load_tokenizers([spec]).for_spec(spec).count
    # the text, then the call's name and its pieces as written, counted whole so far (and the
    # pieces since the last whole count, at most an eighth of it, each alone: a little more)
    written = ["Let me look.", "get_weather", *pieces]
    wholes = [count(written[0]) + count("".join(written[1:n])) for n in range(2, len(written) + 1)]
    counts = [c.progress.output_tokens for c in chunks if c.WhichOneof("part") == "progress"]
    assert all(w <= c <= w * 9 / 8 for w, c in zip(wholes, counts, strict=True))
    (use,) = [c.block.tool_use for c in chunks if c.WhichOneof("part") == "block"]
    assert (use.name, use.input_json) == ("get_weather", '{"city": "Paris"}')
