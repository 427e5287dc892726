"""A prefill an engine repeats at the start of its answer is stripped (``echoes_prefill``).

llama-server (the cached llama-cpp-python 0.3.36 build) continues a prefill but streams it
again first: [user, assistant "The capital of France is"] -> "The capital of France is Paris."
with completion_tokens 3 (its first delta "The capital of France is Paris"). local-small and
local-large take a prefill, so a caller joining prefill and answer got the prefill twice.
Through the replica's adapter and the loopback OpenAI server (the engine's own answer:
``tests/integration/test_llama_engine.py``); the bill is the engine's completion_tokens, as
before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.models import ModelSpec, load_model_table
from services.common.tokens import load_cl100k
from services.model.providers.prefill_echo import EchoedPrefill
from tests.providers import openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import Reply, WireServer

PREFILL = "The capital of France is"


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


def _call(model: str, prefill: str) -> model_pb2.GenerateRequest:
    question = pb.Message(
        role=pb.ROLE_USER, content=[pb.ContentBlock(text="What is the capital of France?")]
    )
    turns = [question]
    if prefill:
        turns.append(pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text=prefill)]))
    request = pb.CompleteRequest(model=model, max_tokens=8, messages=turns)
    return model_pb2.GenerateRequest(tenant="t", model=model, request=request)


async def _answer(
    server: WireServer, spec: ModelSpec, prefill: str, pieces: list[str]
) -> tuple[list[str], model_pb2.GenerateEnd]:
    """The text deltas and the end a replica of ``spec`` sends for the engine's ``pieces``."""
    settings = provider_settings("openai", server.base + "/v1")  # an engine that takes no key
    api = provider_replica(settings, [spec], tokenizer=load_cl100k())
    server.script(
        "openai", Reply(events=openai_wire.stream("m", pieces, openai_wire.usage(42, 0, 3)))
    )
    deltas: list[str] = []
    end = model_pb2.GenerateEnd()
    try:
        async for chunk in api.generate(_call(spec.id, prefill), 10.0):
            if chunk.WhichOneof("part") == "text":
                deltas.append(chunk.text)
            elif chunk.WhichOneof("part") == "end":
                end = chunk.end
    finally:
        await api.close()
    return deltas, end


def _row(echoes: bool) -> ModelSpec:
    spec = load_model_table().models["local-small"]
    return spec.model_copy(update={"echoes_prefill": echoes})


@pytest.mark.parametrize(
    "pieces",
    [
        ["The capital of France is Paris", "."],  # llama-server's: the echo in the first delta
        ["The capital ", "of France", " is", " Paris", "."],  # the echo over several deltas
    ],
)
async def test_the_echoed_prefill_is_stripped(server: WireServer, pieces: list[str]) -> None:
    deltas, end = await _answer(server, _row(echoes=True), PREFILL, pieces)
    print(f"\nsent: {''.join(deltas)!r}")
    assert PREFILL + "".join(deltas) == "The capital of France is Paris."  # once
    assert end.output_tokens == 3  # the engine's completion_tokens, as before


async def test_the_shipped_llama_server_rows_strip_it(server: WireServer) -> None:
    table = load_model_table()
    assert table.models["local-small"].echoes_prefill and table.models["local-large"].echoes_prefill
    deltas, _ = await _answer(
        server, table.models["local-small"], PREFILL, ["The capital of France is Paris."]
    )
    assert "".join(deltas) == " Paris."  # was "The capital of France is Paris."


@pytest.mark.parametrize(
    ("echoes", "prefill", "pieces"),
    [
        (True, PREFILL, [" Paris", "."]),  # no echo: the answer as it came
        (True, PREFILL, ["The capital"]),  # only a beginning of the prefill: no echo of it
        (True, PREFILL, ["The capital of Spain is Madrid."]),
        (True, "", ["The capital of France is Paris."]),  # no prefill
        (False, PREFILL, ["The capital of France is Paris."]),  # a row that does not echo
    ],
)
async def test_an_answer_that_does_not_start_with_the_prefill_is_kept(
    server: WireServer, echoes: bool, prefill: str, pieces: list[str]
) -> None:
    deltas, _ = await _answer(server, _row(echoes), prefill, pieces)
    assert "".join(deltas) == "".join(pieces)


def test_the_echo_is_held_back_only_while_it_may_be_one() -> None:
    echo = EchoedPrefill("ab")
    assert [echo.take("a"), echo.take("b"), echo.take("c"), echo.rest()] == ["", "", "c", ""]
    assert EchoedPrefill("ab").take("abc") == "c"
    mismatch = EchoedPrefill("ab")
    assert [mismatch.take("a"), mismatch.take("x")] == ["", "ax"]


def test_only_a_self_hosted_row_that_continues_a_prefill_may_say_it() -> None:
    spec = load_model_table().models["gpt-4o"]
    with pytest.raises(ValueError, match="echoes_prefill is for a self-hosted row"):
        ModelSpec.model_validate({**spec.model_dump(exclude_unset=True), "echoes_prefill": True})
