"""An unmarked call with its own request_id (grpcurl, another language's stub: no
``cachemesh-retry`` mark) is answered and billed once across routers too: it claims its id in
the answer ledger once L1 missed, just before its model call, never on an L1 hit (no Redis
round trip there). The ledger is a real Redis; the pipelines are the fakes of
test_router_answer_ledger, which await ``before_model`` as the real one does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import SystemClock
from services.router import servicer as servicer_module
from services.router.answer_ledger import ledger_key
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.pipeline import chunks_of
from tests.redis_server import client_of, redis_server
from tests.unit.test_router_answer_ledger import (
    Aborted,
    CountingLedger,
    FakeContext,
    FakePipeline,
    GatedPipeline,
    _replay_of,
    _request,
    _router,
)
from tests.waits import reached

PROMPT_TOKENS = 10

# the answer ledger's wait: the service's 0.5 s fails open under load (the call goes on unclaimed)
PATIENT_S = 10.0


@pytest.fixture(autouse=True)
def _patient_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded test machine may take longer than the service's 0.5 s to answer."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", PATIENT_S)


class BilledPipeline(FakePipeline):
    """A model call's answer with its usage and cost (what a replay must not count again)."""

    async def run(
        self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
    ) -> AsyncIterator[pb.CompleteChunk]:
        before_model = kwargs.get("before_model")
        if before_model is not None and (replayed := await before_model()) is not None:
            self.replays += 1
            for chunk in chunks_of(replayed):
                yield chunk
            return
        if (model_sent := kwargs.get("model_sent")) is not None:
            model_sent()  # as the real pipeline does as it sends its model call
        self.runs += 1
        answer = pb.CompleteResponse(
            served_by=pb.LAYER_MODEL,
            model=request.model,
            request_id=request.request_id,
            usage=pb.Usage(input_tokens=PROMPT_TOKENS, output_tokens=30),
            cost=pb.Cost(cost_nanos=160_000),
        )
        answer.content.add(text=f"answer {self.runs}")
        for chunk in chunks_of(answer):
            yield chunk


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


def test_an_l1_hit_makes_no_ledger_call(redis_url: str) -> None:
    """The hit path is benchmarked: an unmarked request with its own id served by L1 costs no
    Redis round trip (nor is a hit recorded: it billed nothing)."""

    async def run() -> None:
        servicer, _, first_ledger = _router(
            redis_url, pipeline=FakePipeline(pb.LAYER_SEMANTIC_CACHE)
        )
        ledger = servicer._ledger = CountingLedger(redis_url)
        answer = await servicer.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert answer.served_by == pb.LAYER_SEMANTIC_CACHE and ledger.calls == []
        await ledger.close()
        await first_ledger.close()

    asyncio.run(run())


def test_an_unmarked_repeat_on_another_router_is_the_recorded_answer(redis_url: str) -> None:
    async def run() -> None:
        first, first_pipe, first_ledger = _router(redis_url)
        second, second_pipe, unused = _router(redis_url)
        ledger = second._ledger = CountingLedger(redis_url)
        answer = await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        again = await second.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert _replay_of(answer, again)
        assert (first_pipe.runs, second_pipe.runs, second_pipe.replays) == (1, 0, 1)
        assert ledger.calls == ["claim"]  # read, not recorded again
        # the second router keeps the answer: a third try there is its own replay, no Redis
        third = await second.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert _replay_of(answer, third) and ledger.calls == ["claim"]
        for each in (first_ledger, unused, ledger):
            await each.close()

    asyncio.run(run())


def test_unmarked_duplicates_at_once_on_two_routers_make_one_model_call(redis_url: str) -> None:
    """The second waits on the first's claim (its model call still runs), then replays."""

    async def run() -> None:
        gate = asyncio.Event()
        first, _, first_ledger = _router(redis_url)
        second, _, second_ledger = _router(redis_url)
        first._pipeline = first_pipe = GatedPipeline(gate)  # type: ignore[assignment]
        second._pipeline = second_pipe = GatedPipeline(gate)  # type: ignore[assignment]
        one = asyncio.ensure_future(first.Complete(_request(), FakeContext()))  # type: ignore[arg-type]
        await reached(first_pipe.started, "first_pipe.started")
        two = asyncio.ensure_future(second.Complete(_request(), FakeContext()))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert not two.done() and second_pipe.runs == 0  # waits on the first call's claim
        gate.set()
        answers = await asyncio.gather(one, two)
        assert (first_pipe.runs, second_pipe.runs) == (1, 0)
        assert _replay_of(answers[0], answers[1])
        for each in (first_ledger, second_ledger):
            await each.close()

    asyncio.run(run())


def test_a_replay_gives_its_reservation_back_and_a_conflict_too(redis_url: str) -> None:
    """Admitted before L1, an unmarked repeat served the ledger's answer used nothing: its
    reservation (prompt + max_tokens) goes back whole and no cost is counted (the first call
    was billed); as for a repeat refused there for a different request under the id."""

    async def run() -> None:
        store = MemoryLimitStore()  # shared, as routers share it in Redis
        policy = LimitPolicy(tokens_per_min=600, day_budget_nanos=10**12)  # 10 tokens a s
        limits = [
            Limiter(store, UniformPolicies(policy), SystemClock(), lambda r: PROMPT_TOKENS)
            for _ in range(2)
        ]
        first, _, first_ledger = _router(redis_url, limits[0], BilledPipeline())
        second, second_pipe, second_ledger = _router(redis_url, limits[1], BilledPipeline())
        await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        await limits[0].drain()
        spent = dict(store._spent)
        assert spent  # the first call's cost, counted
        full = store._buckets[("tenant-a", "tokens")].level  # 74 reserved, 40 used
        again = await second.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert again.replayed and second_pipe.runs == 0
        context = FakeContext()
        with pytest.raises(Aborted):
            await second.Complete(_request("Another question"), context)  # type: ignore[arg-type]
        assert context.status == grpc.StatusCode.INVALID_ARGUMENT and second_pipe.runs == 0
        await limits[1].drain()
        # each took 74 at its admission and gave them back (a settle of the replay gave 34)
        assert store._buckets[("tenant-a", "tokens")].level == pytest.approx(full, abs=5)
        assert store._spent == spent  # no second cost
        for each in (first_ledger, second_ledger):
            await each.close()

    asyncio.run(run())


def test_a_ledger_claim_of_an_unmarked_call_that_fails_is_given_back(redis_url: str) -> None:
    async def run() -> None:
        servicer, _, ledger = _router(redis_url)
        servicer._pipeline = GatedPipeline(fails=True)  # type: ignore[assignment]
        context = FakeContext()
        with pytest.raises(Aborted):
            await servicer.Complete(_request(), context)  # type: ignore[arg-type]
        assert context.status == grpc.StatusCode.UNAVAILABLE
        await asyncio.gather(*servicer._background)  # the claim given back, after the call
        client = client_of(redis_url)
        assert not await client.exists(ledger_key("tenant-a", "req-1"))  # a retry runs at once
        await client.aclose()
        await ledger.close()

    asyncio.run(run())


def test_a_request_without_its_own_id_never_calls_the_ledger(redis_url: str) -> None:
    async def run() -> None:
        servicer, pipe, unused = _router(redis_url)
        ledger = servicer._ledger = CountingLedger(redis_url)
        answer = await servicer.Complete(build_request("Hi", model="sim-small"), FakeContext())  # type: ignore[arg-type]
        assert answer.request_id and pipe.before_model == 0 and ledger.calls == []
        await ledger.close()
        await unused.close()

    asyncio.run(run())
