"""A self-hosted engine serving a reasoning model is working while it thinks, not hung: the
stack's two model processes serve ``local-small`` (a self-hosted row) through the OpenAI
adapter, both in front of one loopback OpenAI-compatible server (``tests.providers``, the wire
format llama-server speaks: its thinking in ``delta.reasoning_content``), and the router cuts a
call silent mid-answer after ``ROUTER_MID_ANSWER_STALL_S`` (0.5 s here). The engine writes
nothing, or some text, then thinks in small pieces a tenth of a second apart for 2 s, then
answers: each piece of thinking is a sign of life, so the call is neither handed over as
stalled before its first token nor cut as silent after its text (it was, until the model
processes passed the thinking on as ``progress``), and the caller gets the answer, without
the thinking, billed as the engine counted it. An engine that truly goes silent after its
thinking is still cut, and billed for its thinking (which the router never sees: the model
processes' running count of it)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from cachemesh import CachemeshError
from cachemesh.v1 import gateway_pb2 as pb
from services.common.tokens import load_cl100k
from tests.integration.engine_stall import MODEL, EngineStack, engine_stack
from tests.providers import openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

PIECE_GAP_S = 0.1  # between two pieces of the thinking
# 2 s of thinking: four times the stall limit, and twice the handover of a call without its
# first token (the router's STALL_FLOOR_S, 1 s, plus twice a short prompt's predicted prefill)
THINKING = tuple(f"Step {n}: weigh the figures. " for n in range(20))
SILENCE_S = 5.0  # a hung engine's silence after its thinking: ten times the stall limit
LEAD = "Let me check the figures."
ANSWER = "Revenue grew 12% in the quarter."
COMPLETION_TOKENS = 260  # the engine's count: its thinking (240) and its answer


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineStack]:
    with engine_stack(tmp_path_factory.mktemp("reasoning-stall-run")) as stack:
        yield stack


def _request(question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        max_tokens=512,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
    )


def _thinking_reply(lead: bool, pause: float) -> Reply:
    """Nothing or ``LEAD``, then ``THINKING`` (each piece after ``pause``), then ``ANSWER``."""
    texts = [LEAD, ANSWER] if lead else [ANSWER]
    events = openai_wire.stream(
        "local",
        texts,
        openai_wire.usage(40, 0, COMPLETION_TOKENS, reasoning=240),
        reasoning=THINKING,
        reasoning_at=len(texts) - 1,
    )
    # events: role, [the lead], the thinking, the answer, finish, usage, [DONE]
    first = 2 if lead else 1
    pauses = {first + n: pause for n in range(len(THINKING))}
    return Reply(events=events, pauses=pauses)


def _texts(chunks: list[pb.CompleteChunk]) -> list[str]:
    return [c.delta.text for c in chunks if c.WhichOneof("part") == "delta"]


@pytest.mark.parametrize("streamed", [True, False], ids=["StreamComplete", "Complete"])
@pytest.mark.parametrize("lead", [False, True], ids=["thinking-first", "after-text"])
def test_a_thinking_engine_is_not_cut_as_silent(
    engine: EngineStack, lead: bool, streamed: bool
) -> None:
    engine.server.reset()
    engine.server.script("openai", _thinking_reply(lead, PIECE_GAP_S))
    request = _request("How did revenue do this quarter?")
    expected = (LEAD + ANSWER) if lead else ANSWER
    if streamed:
        try:
            chunks = list(engine.client.stream(request))
        except CachemeshError as error:  # the call was cut as silent, its text already sent
            pytest.fail(f"the stream failed: {error}")
        assert "".join(_texts(chunks)) == expected  # the thinking is not the client's
        end = chunks[-1].end
    else:
        end = engine.client.complete(request)
        assert [b.text for b in end.content] == [expected]  # not another replica's answer
    assert end.stop_reason == "end_turn"
    # billed as the engine counted its output (its thinking in it), not counted again
    assert end.usage.output_tokens == COMPLETION_TOKENS
    # one engine call: none handed over or cut and written again by the other replica
    assert len(engine.server.seen_by("openai")) == 1


def test_an_engine_silent_after_its_thinking_is_still_cut(engine: EngineStack) -> None:
    engine.server.reset()
    reply = _thinking_reply(True, 0.0)
    reply.pauses = {2 + len(THINKING): SILENCE_S}  # nothing after the thinking
    engine.server.script("openai", reply)
    chunks: list[pb.CompleteChunk] = []
    with pytest.raises(CachemeshError) as raised:
        for chunk in engine.client.stream(_request("How did revenue do?")):
            chunks.append(chunk)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "silent mid-answer" in raised.value.message
    assert _texts(chunks) == [LEAD]  # the text had reached the caller, the thinking never
    # billed for the text and the thinking (the model service's last running count of them),
    # not for the text alone (the router's own count, before)
    tokenizer = load_cl100k()  # local-small's vocabulary
    wrote = tokenizer.count(LEAD) + tokenizer.count("".join(THINKING))
    billed = _billed_output(engine, chunks[0].start.trace_id)
    assert wrote <= billed <= wrote * 9 / 8


def _billed_output(engine: EngineStack, trace_id: str) -> int:
    """The output tokens a call cut without its answer was billed: its ``chat`` span's (held
    open until its FINAL; exporters batch, so it comes a little after)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for span in engine.sink.spans_of(trace_id):
            billed = span.attributes.get("gen_ai.usage.output_tokens")
            if span.service == "router" and span.name.startswith("chat ") and billed is not None:
                return int(billed)
        time.sleep(0.2)
    raise AssertionError("the cut call's chat span never came with its bill")
