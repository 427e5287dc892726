"""A caller that reads its streamed answer slowly (a small receive window, a busy client)
holds the router's write. The router reads the model's stream ahead of it, in its own task
(``read_ahead``), so the model call ends on the model's time: its deadline
(``ROUTER_MODEL_TIMEOUT_S``) is not spent waiting on the caller, the answer is whole and
billed by its end, and the replica's signs of life are seen as they come. The fake stream
fails DEADLINE_EXCEEDED on a read past its deadline before it was drained, as gRPC does with
chunks the router left in the transport. The clock is injected."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.router.dependencies import CallFailed, Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeSemantic, _settings
from tests.unit.test_router_replica_ejection import (
    REPLICAS,
    Clock,
    Models,
    Stream,
    WarmOnLargeOne,
    _pipeline,
)

TOKENS = 6
REPORTED_TOKENS = 50  # a provider's count of an answer the router saw 6 pieces of


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


REPORT = pc.ProviderUsage(
    anthropic=pc.AnthropicUsage(
        input_tokens=16, cache_read_input_tokens=1984, output_tokens=REPORTED_TOKENS
    )
)


class Reporting(Models):
    """A provider's whole answer: ``TOKENS`` pieces of text, its end counting
    ``REPORTED_TOKENS`` with the provider's report."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Stream:
        self.calls.append(replica)
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=2000)
        end = model_pb2.GenerateEnd(
            output_tokens=REPORTED_TOKENS, stop_reason="end_turn", provider_usage=REPORT
        )
        return Stream(
            [
                model_pb2.GenerateChunk(start=start),
                *(model_pb2.GenerateChunk(text=f"t{i} ") for i in range(TOKENS)),
                model_pb2.GenerateChunk(end=end),
            ]
        )


class Finals(WarmOnLargeOne):
    def __init__(self) -> None:
        self.finals: list[pc.CommitRequest] = []

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_FINAL:
            self.finals.append(request)
        return await super().commit(request, deadline_s)


async def test_a_caller_leaving_after_the_end_was_read_ahead_is_billed_by_the_end() -> None:
    # the model's end (50 tokens, the provider's report) is in the buffer when its caller
    # leaves at its first token: the bill is the end's, not a count of the text taken (13)
    models = Reporting(Clock(), {})
    prefix = Finals()
    deps = Dependencies(FakeSemantic(), prefix, models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=models.clock
    )
    request = build_request("a long answer", model="sim-large", request_id="left")
    async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                for _ in range(20):  # the reading runs ahead to the model's end
                    await asyncio.sleep(0)
                break
    await pipeline.drain()
    (final,) = prefix.finals
    assert final.output_tokens == REPORTED_TOKENS
    assert final.provider_usage.anthropic.cache_read_input_tokens == 1984


async def test_an_answer_read_ahead_to_its_end_frees_its_slot_before_its_caller_reads_it() -> None:
    # a one-slot replica (llama-server --parallel 1): its answer ended; a call sent there now
    # need not wait for this one's caller to read the rest
    clock = Clock()
    models = Models(clock, {})
    pipeline = _pipeline(models, {"local-small": ("local-1",)})
    request = build_request("q", model="local-small", request_id="slot")
    async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
        async for _chunk in run:
            break  # the caller reads slowly: it holds the rest
        for _ in range(20):
            await asyncio.sleep(0)
        assert not pipeline.loads.slots_taken("local-1")
