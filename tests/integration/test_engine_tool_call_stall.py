"""A slow self-hosted engine writing a tool call is working, not hung: the stack's two model
processes serve ``local-small`` (a self-hosted row) through the OpenAI adapter, both in front
of one loopback OpenAI-compatible server (``tests.providers``, the wire format llama-server
speaks), and the router cuts a call silent mid-answer after ``ROUTER_MID_ANSWER_STALL_S``
(0.5 s here). The engine writes some text, then a tool call's arguments in small pieces a
tenth of a second apart for 1.5 s: each piece is a sign of life, so the call is not cut (it
was, as silent, until the model processes passed on that the arguments were coming: the
adapter sends the call whole once written), and the caller gets the tool call whole, as
before. An engine that truly goes silent after its text is still cut."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from cachemesh import CachemeshError
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.engine_stall import MODEL, EngineStack, engine_stack
from tests.providers import openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

PIECE_GAP_S = 0.1  # between two pieces of the tool call's arguments
PIECES = 15  # 1.5 s of arguments: three times the stall limit
SILENCE_S = 5.0  # a hung engine's silence after its text: ten times the stall limit
ARGUMENTS = json.dumps({"path": "notes/report.md", "content": "Quarterly revenue grew. " * 8})
TEXT = "I'll write the report."


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineStack]:
    # an engine whose model takes tools (the packaged local-small, SmolLM2's, does not)
    with engine_stack(tmp_path_factory.mktemp("tool-stall-run"), takes_tools=True) as stack:
        yield stack


def _request(question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        max_tokens=512,
        tools=[
            pb.Tool(
                name="write_file",
                description="Writes a file.",
                input_schema_json=json.dumps(
                    {
                        "type": "object",
                        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                    }
                ),
            )
        ],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
    )


def _tool_call_reply(pauses: dict[int, float]) -> Reply:
    """Some text, then a tool call whose arguments come in ``PIECES`` pieces."""
    size = -(-len(ARGUMENTS) // PIECES)
    pieces = [ARGUMENTS[i : i + size] for i in range(0, len(ARGUMENTS), size)]
    events = openai_wire.stream(
        "local",
        [TEXT],
        openai_wire.usage(40, 0, 60),
        finish="tool_calls",
        tool=("call_1", "write_file", pieces),
    )
    return Reply(events=events, pauses=pauses)


def _slow_tool_call() -> Reply:
    # events: role, the text, the call's name, its argument pieces, finish, usage, [DONE]
    first_piece = 3
    return _tool_call_reply({first_piece + n: PIECE_GAP_S for n in range(PIECES)})


def _content(chunks: list[pb.CompleteChunk]) -> list[pb.ContentBlock]:
    return [c.delta for c in chunks if c.WhichOneof("part") == "delta"]


@pytest.mark.parametrize("streamed", [True, False], ids=["StreamComplete", "Complete"])
def test_a_slow_engines_tool_call_is_not_cut_as_silent(engine: EngineStack, streamed: bool) -> None:
    engine.server.reset()
    engine.server.script("openai", _slow_tool_call())
    request = _request("Write the quarterly report to notes/report.md.")
    if streamed:
        try:
            chunks = list(engine.client.stream(request))
        except CachemeshError as error:  # the call was cut as silent, its text already sent
            pytest.fail(f"the stream failed: {error}")
        blocks = _content(chunks)
        assert [b.WhichOneof("kind") for b in blocks] == ["text", "tool_use"]  # as before
        assert blocks[0].text == TEXT
        tool_use = blocks[1].tool_use
        end = chunks[-1].end
    else:
        end = engine.client.complete(request)
        kinds = [b.WhichOneof("kind") for b in end.content]
        assert kinds == ["text", "tool_use"], end.content  # not another replica's text
        tool_use = end.content[1].tool_use
    assert (tool_use.id, tool_use.name) == ("call_1", "write_file")
    assert json.loads(tool_use.input_json) == json.loads(ARGUMENTS)  # whole
    assert end.stop_reason == "tool_use"
    # one engine call: none cut and written again by the other replica (billed twice)
    assert len(engine.server.seen_by("openai")) == 1


def test_an_engine_silent_after_its_text_is_still_cut(engine: EngineStack) -> None:
    engine.server.reset()
    engine.server.script("openai", _tool_call_reply({2: SILENCE_S}))  # nothing after the text
    chunks: list[pb.CompleteChunk] = []
    with pytest.raises(CachemeshError) as raised:
        for chunk in engine.client.stream(_request("Write the quarterly report.")):
            chunks.append(chunk)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "silent mid-answer" in raised.value.message
    assert [b.text for b in _content(chunks)] == [TEXT]  # the text had reached the caller
