"""A Gateway call whose model calls were all refused by their replicas before any output used
no model tokens and was billed nothing: its limits' reservation (prompt + max_tokens) goes back
whole, as for a call that ended before its first model call was sent. A refusal is the
replica's own status before its start (UNAVAILABLE, RESOURCE_EXHAUSTED, INVALID_ARGUMENT: the
model service's, or a provider's 4xx/429/5xx); a call that produced anything (a start: its
prompt is billed) keeps today's billing, and one cut by the time before its start (the replica
may be prefilling) keeps its reservation, as before.

The real servicer, pipeline and limiter (its store a real Redis on a frozen clock, as in
``test_router_early_cancel``): the pipeline tells the refusals (``model_refused``) to the
call's ``ModelUse``, and ``Limiter.finish`` counts its end by them; the replicas are fakes
that refuse at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from redis.asyncio import Redis

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.router.dependencies import CallFailed
from tests.redis_server import client_of
from tests.unit.test_router_answer_ledger import Aborted, FakeContext
from tests.unit.test_router_early_cancel import (
    PLANNED_PROMPT,
    RESERVED,
    TOKENS_PER_MIN,
    Router,
    _grpc,
    _request,
    _router,
)
from tests.unit.test_router_pipeline import FakeModels, FakeStream

# each replica of sim-large refuses at once, before any start
REFUSALS = [
    pytest.param(Code.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, 2, id="unavailable"),
    pytest.param(
        Code.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED, 1, id="resource_exhausted"
    ),
    pytest.param(Code.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, 1, id="invalid_argument"),
]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = client_of(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def _refusing(code: Code) -> FakeModels:
    return FakeModels(failing={"large-1", "large-2"}, failure=CallFailed(code, "refused"))


async def _call(router: Router, streamed: bool) -> FakeContext:
    """One Complete (or StreamComplete) call to its end, its context telling its status."""
    context = FakeContext()
    with contextlib.suppress(Aborted):  # the status it ended with is the context's
        if streamed:
            async for _ in router.servicer.StreamComplete(_request(), _grpc(context)):
                pass
        else:
            await router.servicer.Complete(_request(), _grpc(context))
    return context


@pytest.mark.parametrize("streamed", [False, True], ids=["Complete", "StreamComplete"])
@pytest.mark.parametrize(("code", "status", "calls"), REFUSALS)
async def test_a_call_its_replicas_refused_gives_its_reservation_back(
    redis: Redis, streamed: bool, code: Code, status: grpc.StatusCode, calls: int
) -> None:
    """Before: it kept its 522 tokens (59,478 of 60,000 left) for calls that used none."""
    router = _router(redis, models=_refusing(code))
    context = await _call(router, streamed)
    assert context.status == status
    assert len(router.models.calls) == calls  # UNAVAILABLE: handed to the other replica too
    assert [c for c in router.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL] == []
    assert await router.level() == TOKENS_PER_MIN


@pytest.mark.parametrize("streamed", [False, True], ids=["Complete", "StreamComplete"])
async def test_a_call_one_replica_refused_and_another_answered_counts_its_answer(
    redis: Redis, streamed: bool
) -> None:
    """The hand-over: the answer's usage (prompt 40 + 3 output) replaces the reservation."""
    models = ScriptedModels([_refusal(Code.UNAVAILABLE), _answered()])
    router = _router(redis, models=models)
    context = await _call(router, streamed)
    assert context.status is None
    assert len(models.calls) == 2
    assert await router.level() == TOKENS_PER_MIN - PLANNED_PROMPT - 3


@pytest.mark.parametrize("streamed", [False, True], ids=["Complete", "StreamComplete"])
async def test_a_call_cut_mid_answer_then_refused_elsewhere_is_billed_what_it_produced(
    redis: Redis, streamed: bool
) -> None:
    """A call that produced something keeps today's billing: the first replica's start came
    (its prompt is billed) before it broke off, the other replica refused the retry; the
    bill of the cut call replaces the reservation."""
    models = ScriptedModels([_cut_after_prefill(), _refusal(Code.UNAVAILABLE)])
    router = _router(redis, models=models)
    context = await _call(router, streamed)
    assert context.status == grpc.StatusCode.UNAVAILABLE
    assert len(models.calls) == 2
    level = await router.level()
    final = [c for c in router.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert len(final) == 1
    assert level == TOKENS_PER_MIN - PLANNED_PROMPT - final[0].output_tokens


async def test_a_call_its_deadline_cut_before_any_start_keeps_its_reservation(
    redis: Redis,
) -> None:
    """Not a refusal: a replica cut by the time before its start may have been prefilling (a
    provider may bill it), so the reservation is kept, as before."""
    router = _router(redis, models=_refusing(Code.DEADLINE_EXCEEDED))
    context = await _call(router, streamed=False)
    assert context.status == grpc.StatusCode.UNAVAILABLE  # no replica could serve it
    assert len(router.models.calls) == 2
    assert await router.level() == TOKENS_PER_MIN - RESERVED


def _refusal(code: Code) -> list[model_pb2.GenerateChunk | CallFailed]:
    return [CallFailed(code, "refused")]


def _answered() -> list[model_pb2.GenerateChunk | CallFailed]:
    return [
        model_pb2.GenerateChunk(
            start=model_pb2.GenerateStart(replica="r", prompt_tokens=PLANNED_PROMPT)
        ),
        model_pb2.GenerateChunk(text="Hello there."),
        model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(output_tokens=3, stop_reason="end_turn")),
    ]


def _cut_after_prefill() -> list[model_pb2.GenerateChunk | CallFailed]:
    """A call whose replica dies after its start, before any token reached the caller."""
    return [
        model_pb2.GenerateChunk(
            start=model_pb2.GenerateStart(replica="r", prompt_tokens=PLANNED_PROMPT)
        ),
        CallFailed(Code.UNAVAILABLE, "died"),
    ]


class ScriptedModels(FakeModels):
    """The replicas answer each Generate, in the order sent, with the next script's chunks
    (whichever replica the router chose)."""

    def __init__(self, scripts: list[list[model_pb2.GenerateChunk | CallFailed]]) -> None:
        super().__init__()
        self.scripts = list(scripts)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        return FakeStream(self.scripts.pop(0))
