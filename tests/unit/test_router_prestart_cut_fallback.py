"""A provider replica that stalls after its provider reported the prompt (Anthropic's
message_start), before any token, is cut at its call's deadline with a ``start`` flagged
``cut_before_first_token`` and an interrupted end carrying that usage. When that deadline was
``ROUTER_MODEL_TIMEOUT_S`` and the client's leaves more time (none, or the HTTP front's 600 s
against 300 s), the request goes to another replica, as one that failed before its start
does: nothing of the cut call reached the client, and its prompt is billed as reported. A cut
at the client's own deadline still ends DEADLINE_EXCEEDED. The clock is injected."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code, RequestError
from services.router.billing import Bills
from services.router.dependencies import CallFailed, Dependencies
from services.router.model_answer import DeadlineCut
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeSemantic, _settings
from tests.unit.test_router_prestart_cut_health import PROVIDER, StallsAfterTheReport
from tests.unit.test_router_replica_ejection import REPLICAS, Clock, Stream, WarmOnLargeOne

MODEL_TIMEOUT_S = 5.0  # ROUTER_MODEL_TIMEOUT_S here


@dataclass
class Commits(WarmOnLargeOne):
    """prefix-cache's Plan as ``WarmOnLargeOne``'s; its commits kept."""

    made: list[pc.CommitRequest] = field(default_factory=list)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.made.append(request)
        return await super().commit(request, deadline_s)


def _pipeline(models: StallsAfterTheReport, commits: Commits) -> Pipeline:
    settings = dataclasses.replace(_settings(), model_timeout_s=MODEL_TIMEOUT_S)
    deps = Dependencies(FakeSemantic(), commits, models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), settings, router, clock=models.clock
    )


async def _chunks(
    pipeline: Pipeline,
    remaining_s: float | None,
    streamed: bool,
    bills: Bills,
    model: str = PROVIDER,
    threshold: float | None = None,
) -> list[pb.CompleteChunk]:
    request = build_request("question", model=model, request_id="r0")
    if threshold is not None:
        request.routing.threshold = threshold
    run = pipeline.run(
        "tenant-a", request, time_remaining_s=remaining_s, streamed=streamed, bills=bills
    )
    return [c async for c in run]


def _finals(commits: Commits, replica: str) -> list[pc.CommitRequest]:
    return [c for c in commits.made if c.replica == replica and c.phase == pc.COMMIT_PHASE_FINAL]


@pytest.mark.parametrize("streamed", [True, False])
@pytest.mark.parametrize("remaining_s", [None, 60.0])
async def test_a_stall_cut_at_the_model_timeout_goes_to_another_replica(
    remaining_s: float | None, streamed: bool
) -> None:
    """anthropic-1 stalls after message_start: cut at ROUTER_MODEL_TIMEOUT_S (5 s) with the
    client's deadline far (none, 60 s), the request goes to anthropic-2, which answers; the
    client saw one start, with the answer (it waited 5 s and got DEADLINE_EXCEEDED, anthropic-2
    never called); anthropic-1's reported prompt billed (its FINAL carries the report)."""
    clock = Clock()
    models = StallsAfterTheReport(clock, {}, stalled={"anthropic-1"})
    commits = Commits()
    pipeline = _pipeline(models, commits)
    bills: Bills = []
    chunks = await _chunks(pipeline, remaining_s, streamed, bills)
    await pipeline.drain()
    parts = [c.WhichOneof("part") for c in chunks]
    print(f"\ncalls={models.calls} parts={parts}")
    assert models.calls == ["anthropic-1", "anthropic-2"]
    assert parts.count("start") == 1 and parts[0] == "start" and parts[-1] == "end"
    assert chunks[0].start.served_by == pb.LAYER_MODEL
    assert chunks[-1].end.content[0].text == "ok"
    (cut,) = _finals(commits, "anthropic-1")
    assert cut.provider_usage.anthropic.cache_creation_input_tokens == 5000
    assert len(bills) == 1  # the cut call's, billed without its answer


@pytest.mark.parametrize(("remaining_s", "routers"), [(4.0, False), (MODEL_TIMEOUT_S + 0.2, True)])
async def test_a_stall_cut_at_the_clients_deadline_is_not_retried(
    remaining_s: float, routers: bool
) -> None:
    """The call's deadline was the client's (4 s against the 5 s timeout), or the client's
    leaves too little past it for another call (5.2 s: 0.1 s, less the reply margin; the cut
    is the router's timeout's): DEADLINE_EXCEEDED, the prompt billed as reported, no other
    replica called."""
    clock = Clock()
    models = StallsAfterTheReport(clock, {}, stalled={"anthropic-1"})
    commits = Commits()
    pipeline = _pipeline(models, commits)
    bills: Bills = []
    with pytest.raises(RequestError) as caught:
        await _chunks(pipeline, remaining_s, True, bills)
    await pipeline.drain()
    assert isinstance(caught.value, DeadlineCut) and caught.value.routers == routers
    assert "billed for its prompt, as the provider reported it" in caught.value.message
    assert models.calls == ["anthropic-1"]
    assert len(bills) == 1  # (the fake's cut comes at the deadline: its FINAL to the outbox)


async def test_every_replica_stalling_ends_deadline_exceeded_after_each_was_tried() -> None:
    """Both replicas stall so (no client deadline): each tried once, each billed its prompt,
    then DEADLINE_EXCEEDED, the router's (an UNAVAILABLE would have the client retry it)."""
    clock = Clock()
    models = StallsAfterTheReport(clock, {}, stalled={"anthropic-1", "anthropic-2"})
    commits = Commits()
    pipeline = _pipeline(models, commits)
    with pytest.raises(RequestError) as caught:
        await _chunks(pipeline, None, True, [])
    await pipeline.drain()
    print(f"\n{caught.value.code.name}: {caught.value.message}")
    assert isinstance(caught.value, DeadlineCut) and caught.value.routers
    assert "ROUTER_MODEL_TIMEOUT_S" in caught.value.message
    assert "billed for its prompt, as the provider reported it" in caught.value.message
    # no token at all: a smaller max_tokens would not help, so the message does not ask for one
    assert "gave no token" in caught.value.message
    assert "max_tokens" not in caught.value.message
    assert sorted(models.calls) == ["anthropic-1", "anthropic-2"]
    assert len(_finals(commits, "anthropic-1")) == len(_finals(commits, "anthropic-2")) == 1


async def test_an_auto_request_goes_to_the_next_tier() -> None:
    """``auto`` routed to the small tier (threshold 1.0), whose one replica stalls so: the
    request goes to the large tier, which answers."""
    clock = Clock()
    models = StallsAfterTheReport(clock, {}, stalled={"small-1"})
    pipeline = _pipeline(models, Commits())
    chunks = await _chunks(pipeline, None, True, [], model="auto", threshold=1.0)
    await pipeline.drain()
    assert models.calls[0] == "small-1" and len(models.calls) == 2
    assert chunks[-1].end.model == "sim-large" and chunks[-1].end.content[0].text == "ok"


async def test_a_stall_cut_is_handed_over_at_most_as_often_as_a_cut_mid_answer() -> None:
    """Four replicas all stalling so: the request tries three (the first and two retries,
    ``_MAX_REPLICA_RETRIES``), then ends DEADLINE_EXCEEDED, the router's."""
    clock = Clock()
    four = tuple(f"anthropic-{n}" for n in range(1, 5))
    models = StallsAfterTheReport(clock, {}, stalled=set(four))
    commits = Commits()
    replicas = {**REPLICAS, PROVIDER: four}
    settings = dataclasses.replace(_settings(), model_timeout_s=MODEL_TIMEOUT_S)
    deps = Dependencies(FakeSemantic(), commits, models, replicas)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(deps, TABLE, TOKENIZER, trace.NoOpTracer(), settings, router, clock=clock)
    with pytest.raises(RequestError) as caught:
        await _chunks(pipeline, None, False, [])
    await pipeline.drain()
    assert isinstance(caught.value, DeadlineCut) and caught.value.routers
    assert len(models.calls) == 3 == len(set(models.calls))


@dataclass
class EndsLate(StallsAfterTheReport):
    """As ``StallsAfterTheReport``, but the interrupted end never reaches the router: the
    call's gRPC deadline ends it after the start (DEADLINE_EXCEEDED)."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Stream:
        stream = super().generate(replica, request, deadline_s)
        return _Late(stream) if replica in self.stalled else stream


class _Late(Stream):
    """``stream`` until its end, which is the gRPC deadline's failure instead."""

    def __init__(self, stream: Stream) -> None:
        super().__init__([])
        self._stream = stream

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = await self._stream.read()
        if chunk is not None and chunk.WhichOneof("part") == "end":
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return chunk


async def test_a_stall_whose_end_came_too_late_goes_to_another_replica_too() -> None:
    """The flagged start, then the gRPC deadline instead of the end: handed over as well (the
    prompt billed as the router counted it)."""
    clock = Clock()
    models = EndsLate(clock, {}, stalled={"anthropic-1"})
    pipeline = _pipeline(models, Commits())
    chunks = await _chunks(pipeline, None, True, [])
    await pipeline.drain()
    assert models.calls == ["anthropic-1", "anthropic-2"]
    assert chunks[-1].end.content[0].text == "ok"
