"""A caller that reads its streamed answer slowly (a small receive window, a busy client)
holds the router's write. The router reads the model's stream ahead of it, in its own task
(``read_ahead``), so the model call ends on the model's time: its deadline
(``ROUTER_MODEL_TIMEOUT_S``) is not spent waiting on the caller, the answer is whole and
billed by its end, and the replica's signs of life are seen as they come. The fake stream
fails DEADLINE_EXCEEDED on a read past its deadline before it was drained, as gRPC does with
chunks the router left in the transport. The clock is injected."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from cachemesh import build_request
from cachemesh.v1 import model_pb2
from services.common.errors import Code
from services.router.dependencies import CallFailed
from tests.unit.test_router_replica_ejection import Clock, Models, Stream, _pipeline

TOKENS = 6


class Deadlined(Stream):
    """An answer written at once: its start, ``TOKENS`` tokens, its end; a read after the
    call's deadline fails as gRPC's does."""

    def __init__(self, clock: Clock, replica: str, deadline_s: float) -> None:
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=2000)
        end = model_pb2.GenerateEnd(output_tokens=TOKENS, stop_reason="end_turn")
        super().__init__(
            [
                model_pb2.GenerateChunk(start=start),
                *(model_pb2.GenerateChunk(text=f"t{i} ") for i in range(TOKENS)),
                model_pb2.GenerateChunk(end=end),
            ]
        )
        self._clock, self._until = clock, clock() + deadline_s

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self._clock() > self._until:
            raise CallFailed(Code.DEADLINE_EXCEEDED, "deadline")
        return await super().read()


@dataclass
class Answering(Models):
    deadlines: list[float] = field(default_factory=list)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Stream:
        self.calls.append(replica)
        self.deadlines.append(deadline_s)
        return Deadlined(self.clock, replica, deadline_s)


async def test_an_answer_its_caller_reads_slower_than_the_deadline_is_whole_and_billed() -> None:
    clock = Clock()
    models = Answering(clock, {})
    pipeline = _pipeline(models)
    request = build_request("a long answer", model="sim-large", request_id="slow")
    texts: list[str] = []
    ends: list[model_pb2.GenerateEnd | object] = []
    async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
        async for chunk in run:
            part = chunk.WhichOneof("part")
            if part == "delta":
                if not texts:  # the caller takes its next chunks past the model's deadline
                    clock.now += models.deadlines[0] + 1.0
                texts.append(chunk.delta.text)
            elif part == "end":
                ends.append(chunk.end)
    await pipeline.drain()
    assert "".join(texts) == "".join(f"t{i} " for i in range(TOKENS))
    (end,) = ends
    assert isinstance(end, type(chunk.end)) and end.usage.output_tokens == TOKENS
    assert models.calls == ["large-1"]
