"""The answer ledger: a retry (gRPC's ``grpc-previous-rpc-attempts``) that reaches a router which
did not answer the first attempt gets the recorded answer, with no second model call and no
second bill; a different request under the same id is refused; a ledger that fails costs only
the protection. The ledger is a real Redis (tests/redis_server.py); the pipeline is a fake."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import SystemClock
from services.common.env import ConfigError
from services.common.errors import Code, RequestError
from services.common.metrics import TenantLabels, new_registry
from services.common.models import load_model_table
from services.router import servicer as servicer_module
from services.router import spans
from services.router.answer_ledger import (
    Claimed,
    LedgerUnavailable,
    Recorded,
    RedisAnswerLedger,
    Running,
    ledger_key,
)
from services.router.billing import Bills, Charge, LateBill
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limit_store import Admission
from services.router.limit_wiring import build_answer_ledger
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.metrics import RouterMetrics
from services.router.model_answer import AnswerBilled, ModelRefused, ModelSent
from services.router.pipeline import BeforeModel, chunks_of
from services.router.servicer import GatewayServicer
from services.tools.stack.ports import free_port
from tests.black_hole import BlackHole
from tests.redis_server import client_of, redis_server, require_password
from tests.unit.gateway_support import gateway_servicer, memory_limiter, no_prompt
from tests.waits import reached

KEY = "k-test-0123456789"
TABLE = load_model_table()


class FakePipeline:
    def __init__(self, layer: pb.Layer.ValueType = pb.LAYER_MODEL) -> None:
        self.runs = 0
        self.layer = layer
        self.before_model = 0  # the times it was awaited
        self.replays = 0  # answers served from it

    async def run(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        streamed: bool = True,
        time_remaining_s: float | None = None,
        charge: Charge | None = None,
        bills: Bills | None = None,
        answer_billed: AnswerBilled | None = None,
        retried: bool = False,
        before_model: BeforeModel | None = None,
        model_sent: ModelSent | None = None,
        model_refused: ModelRefused | None = None,
        late_bill: LateBill | None = None,
    ) -> AsyncIterator[pb.CompleteChunk]:
        """An L1 hit (``layer``) never awaits ``before_model``; a model call awaits it first
        and serves what it returns instead (counted in ``replays``, not ``runs``), else tells
        ``model_sent`` (its model call is never refused: ``model_refused`` is not told)."""
        if self.layer != pb.LAYER_SEMANTIC_CACHE and before_model is not None:
            self.before_model += 1
            replayed = await before_model()
            if replayed is not None:
                self.replays += 1
                for chunk in chunks_of(replayed):
                    yield chunk
                return
        if self.layer != pb.LAYER_SEMANTIC_CACHE and model_sent is not None:
            model_sent()
        self.runs += 1
        answer = pb.CompleteResponse(
            served_by=self.layer, model=request.model, request_id=request.request_id
        )
        answer.content.add(text=f"answer {self.runs}")
        for chunk in chunks_of(answer):
            yield chunk


Metadatum = namedtuple("Metadatum", ["key", "value"])  # as grpc.aio hands metadata over


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        items = (("authorization", f"Bearer {KEY}"), *metadata)
        self._metadata = tuple(Metadatum(k, v) for k, v in items)
        self.status: grpc.StatusCode | None = None
        self.message = ""

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None  # the client set no deadline

    def done(self) -> bool:
        return False  # the call is open: a status is sent (``aborts.call_over``)

    async def abort(self, code: grpc.StatusCode, message: str, **_: Any) -> None:
        self.status, self.message = code, message
        raise Aborted(message)

    def code(self) -> grpc.StatusCode | None:
        return self.status


@pytest.fixture(autouse=True)
def _patient_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded test machine may take longer than the service's 0.5 s to answer; these tests
    check what the ledger does, not how fast (the down-ledger test fails at once)."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", 10.0)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


def _router(
    url: str, limits: Limiter | None = None, pipeline: FakePipeline | None = None
) -> tuple[GatewayServicer, FakePipeline, RedisAnswerLedger]:
    pipeline = pipeline or FakePipeline()
    ledger = RedisAnswerLedger(client_of(url), ttl_s=60)
    servicer = gateway_servicer(pipeline, {KEY: "tenant-a"}, limiter=limits, ledger=ledger)
    return servicer, pipeline, ledger


def _request(text: str = "What is a KV cache?") -> pb.CompleteRequest:
    return build_request(text, model="sim-small", request_id="req-1")


RETRY = ("grpc-previous-rpc-attempts", "1")


def _replay_of(first: pb.CompleteResponse, again: pb.CompleteResponse) -> bool:
    """``again`` is ``first`` replayed: the same answer, marked replayed (``first`` is not)."""
    unmarked = pb.CompleteResponse()
    unmarked.CopyFrom(again)
    unmarked.replayed = False
    return again.replayed and not first.replayed and unmarked == first


def test_a_retry_on_another_router_gets_the_recorded_answer(redis_url: str) -> None:
    async def run() -> None:
        first, first_pipe, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        answer = await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        again = await second.Complete(_request(), FakeContext(RETRY))  # type: ignore[arg-type]
        assert _replay_of(answer, again) and again.content[0].text == "answer 1"
        assert (first_pipe.runs, second_pipe.runs) == (1, 0)
        # and the second router now answers it from memory, retry mark or not
        again = await second.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert _replay_of(answer, again) and second_pipe.runs == 0
        # without the retry mark a third router reads the ledger too, once L1 missed (an
        # unmarked repeat of the id, as grpcurl sends it): the answer again, no model call
        third, third_pipe, third_ledger = _router(redis_url)
        fresh = await third.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert _replay_of(answer, fresh) and (third_pipe.runs, third_pipe.replays) == (0, 1)
        for ledger in (first_ledger, second_ledger, third_ledger):
            await ledger.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("mark", "read"),
    [
        (("cachemesh-retry", "1"), True),  # what the Python client and the HTTP front send
        (("grpc-previous-rpc-attempts", "2"), True),
        (("cachemesh-retry", "0"), False),  # "not a retry": was read as one (presence only)
        (("cachemesh-retry", ""), False),
        (("grpc-previous-rpc-attempts", "0"), False),
    ],
)
def test_a_call_is_a_retry_by_the_marks_value_not_its_presence(
    redis_url: str, mark: tuple[str, str], read: bool
) -> None:
    async def run() -> None:
        first, first_pipe, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        await second.Complete(_request(), FakeContext(mark))  # type: ignore[arg-type]
        assert first_pipe.runs == 1 and second_pipe.runs == 0  # the ledger's answer, either way
        # read before anything else, or only once L1 missed (just before the model call)
        assert second_pipe.before_model == (0 if read else 1)
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_a_retry_of_an_answered_request_is_served_whatever_the_limits_say_now(
    redis_url: str,
) -> None:
    """The first answer took the tenant's one request a minute: its retry (the response was
    lost) is still served that answer, on the same router or another one, and takes nothing
    from the limits; a new request is refused."""

    async def run() -> None:
        store = MemoryLimitStore()  # shared, as routers share it in Redis
        limits = [
            Limiter(
                store, UniformPolicies(LimitPolicy(requests_per_min=1)), SystemClock(), no_prompt
            )
            for _ in range(2)
        ]
        first, first_pipe, first_ledger = _router(redis_url, limits[0])
        second, second_pipe, second_ledger = _router(redis_url, limits[1])
        answer = await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        again = await first.Complete(_request(), FakeContext(RETRY))  # type: ignore[arg-type]
        elsewhere = await second.Complete(_request(), FakeContext(RETRY))  # type: ignore[arg-type]
        assert _replay_of(answer, again) and _replay_of(answer, elsewhere)
        assert (first_pipe.runs, second_pipe.runs) == (1, 0)
        refused = FakeContext()
        other = build_request("Another question", model="sim-small", request_id="req-2")
        with pytest.raises(Aborted, match="rate limit"):
            await second.Complete(other, refused)  # type: ignore[arg-type]
        assert refused.status == grpc.StatusCode.RESOURCE_EXHAUSTED and second_pipe.runs == 0
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_refused_requests_take_no_place_in_the_answer_once_table() -> None:
    """A tenant over its limit sends on: its refusals must not push another tenant's answer
    out of the (bounded) table, whose retry would then run and bill again."""

    async def run() -> None:
        rate = UniformPolicies(LimitPolicy(requests_per_min=2))
        servicer, pipeline = _servicer(
            Limiter(MemoryLimitStore(), rate, SystemClock(), no_prompt), 2
        )
        first = build_request("First", model="sim-small", request_id="first")
        await servicer.Complete(first, FakeContext())  # type: ignore[arg-type]
        second = build_request("Second", model="sim-small", request_id="second")
        await servicer.Complete(second, FakeContext())  # type: ignore[arg-type]
        for i in range(20):
            refused = FakeContext()
            more = build_request(f"More {i}", model="sim-small", request_id=f"more-{i}")
            with pytest.raises(Aborted):
                await servicer.Complete(more, refused)  # type: ignore[arg-type]
            assert refused.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        again = await servicer.Complete(first, FakeContext())  # type: ignore[arg-type]
        assert again.content[0].text == "answer 1" and pipeline.runs == 2

    asyncio.run(run())


def test_a_duplicate_of_a_refused_request_is_refused_the_same_way() -> None:
    """Two identical requests at once, the tenant over its limit: both get RESOURCE_EXHAUSTED
    with its retry-after (not UNAVAILABLE 'the first call failed', retried at once)."""

    class SlowStore(MemoryLimitStore):
        async def admit(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.05)
            return await super().admit(*args, **kwargs)

    async def run() -> None:
        rate = UniformPolicies(LimitPolicy(requests_per_min=1))
        servicer, pipeline = _servicer(Limiter(SlowStore(), rate, SystemClock(), no_prompt))
        spent = build_request("Spent", model="sim-small", request_id="spent")
        await servicer.Complete(spent, FakeContext())  # type: ignore[arg-type]
        contexts = (FakeContext(), FakeContext())
        request = build_request("Twice", model="sim-small", request_id="twice")
        calls = [servicer.Complete(request, c) for c in contexts]  # type: ignore[arg-type]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, Aborted) for o in outcomes)
        assert [c.status for c in contexts] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert pipeline.runs == 1

    asyncio.run(run())


def test_concurrent_duplicates_are_one_request_served_one_answer() -> None:
    """Two identical calls at once (a client's retry racing its first attempt): one admission,
    one model call, both answered, even when the limit allows one request a minute; and the
    pair takes one request of the rate, not two."""

    class SlowStore(MemoryLimitStore):
        async def admit(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.05)
            return await super().admit(*args, **kwargs)

    async def run(per_minute: int) -> GatewayServicer:
        rate = UniformPolicies(LimitPolicy(requests_per_min=per_minute))
        servicer, pipeline = _servicer(Limiter(SlowStore(), rate, SystemClock(), no_prompt))
        request = build_request("Once", model="sim-small", request_id="once")
        contexts = (FakeContext(), FakeContext(RETRY))
        calls = [servicer.Complete(request, c) for c in contexts]  # type: ignore[arg-type]
        answers = await asyncio.gather(*calls)
        assert _replay_of(answers[0], answers[1]) and pipeline.runs == 1
        return servicer

    asyncio.run(run(1))

    async def then_another() -> None:
        servicer = await run(2)
        other = build_request("Other", model="sim-small", request_id="other")
        await servicer.Complete(other, FakeContext())  # type: ignore[arg-type]

    asyncio.run(then_another())


def test_refusals_in_flight_never_push_an_answer_out() -> None:
    """A tenant over its limit with refusals still waiting on the limits (a Redis round trip)
    while another tenant's answer is kept: the table's bound counts answers only."""
    key_b = "k-test-b-0123456789"

    class SlowForA(MemoryLimitStore):
        async def admit(self, asked: Admission) -> Any:
            if asked.tenant == "tenant-a":
                await asyncio.sleep(0.2)
            return await super().admit(asked)

    async def run() -> None:
        pipeline = FakePipeline()
        servicer = gateway_servicer(
            pipeline,
            {KEY: "tenant-a", key_b: "tenant-b"},
            answers=IdempotencyTable(SystemClock(), 3600, 5),
            limiter=memory_limiter(LimitPolicy(requests_per_min=3), SlowForA()),
        )

        def as_b() -> FakeContext:
            context = FakeContext()
            context._metadata = (Metadatum("authorization", f"Bearer {key_b}"),)
            return context

        b1 = build_request("B one", model="sim-small", request_id="b1")
        first = await servicer.Complete(b1, as_b())  # type: ignore[arg-type]
        for i in range(3):  # tenant A spends its 3 requests a minute
            spent = build_request(f"A {i}", model="sim-small", request_id=f"a{i}")
            await servicer.Complete(spent, FakeContext())  # type: ignore[arg-type]

        async def refused(i: int) -> None:
            more = build_request(f"More {i}", model="sim-small", request_id=f"more-{i}")
            with pytest.raises(Aborted):
                await servicer.Complete(more, FakeContext())  # type: ignore[arg-type]

        flood = [asyncio.ensure_future(refused(i)) for i in range(10)]
        await asyncio.sleep(0.05)  # the refusals wait on the limits, holding their places
        b2 = build_request("B two", model="sim-small", request_id="b2")
        await servicer.Complete(b2, as_b())  # type: ignore[arg-type]
        await asyncio.gather(*flood)
        runs = pipeline.runs
        again = await servicer.Complete(b1, as_b())  # type: ignore[arg-type]
        assert _replay_of(first, again) and pipeline.runs == runs

    asyncio.run(run())


def test_a_duplicate_of_a_conflicting_retry_gets_the_conflict(redis_url: str) -> None:
    """Two identical retries whose id the ledger holds for another request: both are told
    INVALID_ARGUMENT (the waiting one was told UNAVAILABLE 'retry it', and retried in vain)."""

    async def run() -> None:
        first, _, first_ledger = _router(redis_url)
        second, _, second_ledger = _router(redis_url)
        await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        other = _request("A different question")
        contexts = (FakeContext(RETRY), FakeContext(RETRY))
        calls = [second.Complete(other, c) for c in contexts]  # type: ignore[arg-type]
        await asyncio.gather(*calls, return_exceptions=True)
        assert [c.status for c in contexts] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_a_duplicate_is_not_told_the_first_calls_deadline_passed() -> None:
    """The first call's own deadline passing is not the duplicate's refusal (it set none): it
    takes the id and runs as a new call, as one arriving after would (it was told UNAVAILABLE
    "retry it", an error of the Gateway's own); a refusal of the request itself reaches it as
    a fresh error of its own."""

    class Deadlined(FakeContext):
        def __init__(self, remaining_s: float | None) -> None:
            super().__init__()
            self.remaining_s = remaining_s

        def time_remaining(self) -> float | None:
            return self.remaining_s

    class DeadlinePipeline(FakePipeline):
        async def run(
            self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
        ) -> AsyncIterator[pb.CompleteChunk]:
            self.runs += 1
            await asyncio.sleep(0.05)
            if kwargs.get("time_remaining_s") is not None:
                raise RequestError(Code.DEADLINE_EXCEEDED, "the request's deadline passed")
            if request.model == "sim-large":
                raise RequestError(Code.INVALID_ARGUMENT, "the prompt is over the window")
            for chunk in chunks_of(pb.CompleteResponse(request_id=request.request_id)):
                yield chunk

    async def run() -> None:
        servicer, _ = _servicer(memory_limiter())
        pipeline = DeadlinePipeline()
        servicer._pipeline = pipeline  # type: ignore[assignment]
        request = build_request("Once", model="sim-small", request_id="dl")
        short, patient = Deadlined(0.01), Deadlined(None)
        first = asyncio.ensure_future(servicer.Complete(request, short))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        duplicate = servicer.Complete(request, patient)  # type: ignore[arg-type]
        outcomes = await asyncio.gather(first, duplicate, return_exceptions=True)
        assert short.status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert patient.status is None and isinstance(outcomes[1], pb.CompleteResponse)
        assert not outcomes[1].replayed and pipeline.runs == 2
        bad = build_request("Too long", model="sim-large", request_id="bad")
        contexts = (Deadlined(None), Deadlined(None))
        calls = [servicer.Complete(bad, c) for c in contexts]  # type: ignore[arg-type]
        await asyncio.gather(*calls, return_exceptions=True)
        assert [c.status for c in contexts] == [grpc.StatusCode.INVALID_ARGUMENT] * 2

    asyncio.run(run())


def _servicer(limits: Limiter, max_records: int = 100) -> tuple[GatewayServicer, FakePipeline]:
    """A router without an answer ledger."""
    pipeline = FakePipeline()
    servicer = gateway_servicer(
        pipeline,
        {KEY: "tenant-a"},
        answers=IdempotencyTable(SystemClock(), 3600, max_records),
        limiter=limits,
    )
    return servicer, pipeline


@pytest.mark.parametrize(
    ("layer", "recorded"),
    [(pb.LAYER_PREFIX_CACHE, True), (pb.LAYER_SEMANTIC_CACHE, False)],
)
def test_every_model_call_is_recorded_an_l1_hit_is_not(
    redis_url: str, layer: pb.Layer.ValueType, recorded: bool
) -> None:
    """A model call whose prompt read the provider's cache is billed like any other: a retry
    on another router must get it, not call the model (and bill) again."""

    async def run() -> None:
        first, first_pipe, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        first_pipe.layer = second_pipe.layer = layer
        await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        again = await second.Complete(_request(), FakeContext(RETRY))  # type: ignore[arg-type]
        assert second_pipe.runs == (0 if recorded else 1)
        assert again.content[0].text == "answer 1"
        await first_ledger.close()
        await second_ledger.close()

    asyncio.run(run())


def test_a_different_request_under_a_recorded_id_is_refused(redis_url: str) -> None:
    async def run() -> None:
        first, _, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        await first.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        context = FakeContext(RETRY)
        with pytest.raises(Aborted):
            await second.Complete(_request("Another question"), context)  # type: ignore[arg-type]
        assert context.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "already used for a different request" in context.message
        assert second_pipe.runs == 0
        await first_ledger.close()
        await second_ledger.close()

    asyncio.run(run())


def test_only_the_models_answers_are_recorded_and_keys_hide_the_id(redis_url: str) -> None:
    async def run() -> None:
        servicer, _, ledger = _router(redis_url)
        await servicer.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        client = client_of(redis_url)
        keys = [k async for k in client.scan_iter()]
        assert keys == [ledger_key("tenant-a", "req-1")]
        assert b"req-1" not in keys[0] and b"tenant-a" not in keys[0]
        assert 0 < await client.pttl(keys[0]) <= 60_000
        await client.aclose()
        await ledger.close()

    asyncio.run(run())


def test_a_ledger_that_is_down_costs_only_the_protection(tmp_path: Path) -> None:
    async def run() -> None:
        with redis_server(tmp_path) as url:
            servicer, _, ledger = _router(url)
        # the server is gone: the answer still goes out, and a retry is served anew
        answer = await servicer.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        assert answer.content[0].text == "answer 1"
        other, other_pipe, other_ledger = _router(url)
        again = await other.Complete(_request(), FakeContext(RETRY))  # type: ignore[arg-type]
        assert again.content[0].text == "answer 1" and other_pipe.runs == 1
        await ledger.close()
        await other_ledger.close()

    asyncio.run(run())


CLIENT_MARK = ("cachemesh-retry", "1")  # the Python client's and the HTTP front's: every call


class GatedPipeline(FakePipeline):
    """A model call that runs until the test opens ``gate`` (then answers, or fails)."""

    def __init__(self, gate: asyncio.Event | None = None, fails: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.fails = fails
        self.started = asyncio.Event()

    async def run(
        self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
    ) -> AsyncIterator[pb.CompleteChunk]:
        before_model = kwargs.get("before_model")  # as the real pipeline, once L1 missed
        if before_model is not None and (replayed := await before_model()) is not None:
            self.replays += 1
            for chunk in chunks_of(replayed):
                yield chunk
            return
        if (model_sent := kwargs.get("model_sent")) is not None:
            model_sent()  # as the real pipeline does as it sends its model call
        self.runs += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fails:
            raise RequestError(Code.UNAVAILABLE, "the replica failed")
        answer = pb.CompleteResponse(
            served_by=self.layer, model=request.model, request_id=request.request_id
        )
        answer.content.add(text=f"answer {self.runs}")
        for chunk in chunks_of(answer):
            yield chunk


async def _started_or_waiting(pipeline: GatedPipeline, call: asyncio.Future[Any]) -> None:
    """Until the call reached its own model call, or ended, or (0.5 s) waits on something."""
    await asyncio.wait(
        [asyncio.ensure_future(pipeline.started.wait()), call],
        timeout=0.5,
        return_when=asyncio.FIRST_COMPLETED,
    )


def test_a_retry_on_another_router_while_the_first_call_runs_gets_its_answer(
    redis_url: str,
) -> None:
    """The client's retry reaches a second router while the first router's model call still
    runs: it waits for that call's answer (one model call, one bill), not a call of its own."""

    async def run() -> None:
        gate = asyncio.Event()
        first, _, first_ledger = _router(redis_url)
        second, _, second_ledger = _router(redis_url)
        first._pipeline = first_pipe = GatedPipeline(gate)  # type: ignore[assignment]
        second._pipeline = second_pipe = GatedPipeline(gate)  # type: ignore[assignment]
        one = asyncio.ensure_future(first.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await reached(first_pipe.started, "first_pipe.started")
        two = asyncio.ensure_future(second.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await _started_or_waiting(second_pipe, two)
        gate.set()
        answers = await asyncio.gather(one, two)
        assert (first_pipe.runs, second_pipe.runs) == (1, 0)
        assert _replay_of(answers[0], answers[1]) and answers[1].content[0].text == "answer 1"
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_a_retry_takes_over_once_the_first_routers_claim_has_lapsed(redis_url: str) -> None:
    """The first router died mid-call (its claim is no longer renewed and lapses): the waiting
    retry then makes the call itself, rather than waiting for an answer that never comes."""

    async def run() -> None:
        first, _, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        first._pipeline = first_pipe = GatedPipeline(asyncio.Event())  # type: ignore[assignment]
        one = asyncio.ensure_future(first.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await reached(first_pipe.started, "first_pipe.started")
        client = client_of(redis_url)
        assert await client.exists(ledger_key("tenant-a", "req-1"))  # claimed
        two = asyncio.ensure_future(second.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert not two.done() and second_pipe.runs == 0  # waits on the live claim
        await client.delete(ledger_key("tenant-a", "req-1"))  # the lease lapsed
        answer = await two
        assert answer.content[0].text == "answer 1" and second_pipe.runs == 1
        one.cancel()
        await asyncio.gather(one, return_exceptions=True)
        await client.aclose()
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_a_first_call_that_fails_gives_its_claim_back(redis_url: str) -> None:
    async def run() -> None:
        gate = asyncio.Event()
        first, _, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        first._pipeline = first_pipe = GatedPipeline(gate, fails=True)  # type: ignore[assignment]
        one = asyncio.ensure_future(first.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await reached(first_pipe.started, "first_pipe.started")
        two = asyncio.ensure_future(second.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        gate.set()  # the first call fails: the waiting retry is served anew, at once
        await asyncio.gather(one, return_exceptions=True)
        answer = await asyncio.wait_for(two, 5)
        assert answer.content[0].text == "answer 1" and second_pipe.runs == 1
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_a_waiting_retry_gives_up_at_its_own_deadline(redis_url: str) -> None:
    class Deadlined(FakeContext):
        def time_remaining(self) -> float | None:
            return 0.3

    async def run() -> None:
        gate = asyncio.Event()
        first, _, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        first._pipeline = first_pipe = GatedPipeline(gate)  # type: ignore[assignment]
        one = asyncio.ensure_future(first.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await reached(first_pipe.started, "first_pipe.started")
        context = Deadlined(CLIENT_MARK)
        with pytest.raises(Aborted):
            await second.Complete(_request(), context)  # type: ignore[arg-type]
        assert context.status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "still running on another router" in context.message and second_pipe.runs == 0
        gate.set()
        assert (await one).content[0].text == "answer 1"
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_a_conflicting_retry_is_refused_while_the_first_call_runs(redis_url: str) -> None:
    async def run() -> None:
        gate = asyncio.Event()
        first, _, first_ledger = _router(redis_url)
        second, second_pipe, second_ledger = _router(redis_url)
        first._pipeline = first_pipe = GatedPipeline(gate)  # type: ignore[assignment]
        one = asyncio.ensure_future(first.Complete(_request(), FakeContext(CLIENT_MARK)))  # type: ignore[arg-type]
        await reached(first_pipe.started, "first_pipe.started")
        context = FakeContext(CLIENT_MARK)
        with pytest.raises(Aborted):
            await second.Complete(_request("Another question"), context)  # type: ignore[arg-type]
        assert context.status == grpc.StatusCode.INVALID_ARGUMENT and second_pipe.runs == 0
        gate.set()
        await one
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_an_unmarked_call_claims_its_id_just_before_its_model_call(redis_url: str) -> None:
    """Once L1 missed (an L1 hit makes no Redis round trip: test_router_unmarked_ledger), it
    claims its id, so that a repeat of it on another router waits for its answer; the record
    after its model call replaces the claim."""

    async def run() -> None:
        gate = asyncio.Event()
        servicer, _, ledger = _router(redis_url)
        servicer._pipeline = pipe = GatedPipeline(gate)  # type: ignore[assignment]
        one = asyncio.ensure_future(servicer.Complete(_request(), FakeContext()))  # type: ignore[arg-type]
        await reached(pipe.started, "pipe.started")
        client = client_of(redis_url)
        held = cast(bytes | None, await client.get(ledger_key("tenant-a", "req-1")))
        assert held is not None and held.startswith(b"?")  # claimed
        gate.set()
        await one
        assert await client.exists(ledger_key("tenant-a", "req-1"))  # the answer, recorded
        await client.aclose()
        await ledger.close()

    asyncio.run(run())


class CountingLedger(RedisAnswerLedger):
    """A real ledger that counts the calls made to it (each one a Redis round trip)."""

    def __init__(self, url: str) -> None:
        super().__init__(client_of(url), ttl_s=60)
        self.calls: list[str] = []

    async def claim(self, tenant: str, request_id: str, fingerprint: str, *mine: Any) -> Any:
        self.calls.append("claim")
        return await super().claim(tenant, request_id, fingerprint, *mine)

    async def record(self, tenant: str, request_id: str, fingerprint: str, answer: Any) -> None:
        self.calls.append("record")
        await super().record(tenant, request_id, fingerprint, answer)


@pytest.mark.parametrize("streamed", [False, True])
def test_only_a_request_with_its_callers_own_id_is_claimed_and_recorded(
    redis_url: str, streamed: bool
) -> None:
    """A request sent without a request_id gets one the router makes up, which no caller knows
    to retry with; its answer was recorded all the same, for the idempotency TTL (500 such
    requests left 500 records for 24 h), each after a Redis round trip. Now it is neither
    claimed (a retry mark without an id has nothing to look up) nor recorded; a request with
    the caller's own id still is: the Python client's id, unmarked on its first attempt (its
    gRPC retries carry it to another router), and the HTTP front's Idempotency-Key."""

    async def run() -> None:
        servicer, pipe, _ = _router(redis_url)
        ledger = servicer._ledger = CountingLedger(redis_url)

        async def complete(request: pb.CompleteRequest, *mark: tuple[str, str]) -> Any:
            if not streamed:
                return await servicer.Complete(request, FakeContext(*mark))  # type: ignore[arg-type]
            chunks = servicer.StreamComplete(request, FakeContext(*mark))  # type: ignore[arg-type]
            return [c async for c in chunks][-1].end

        for i, mark in enumerate(((), (CLIENT_MARK,), (RETRY,))):
            answer = await complete(build_request(f"question {i}", model="sim-small"), *mark)
            assert answer.request_id and answer.content  # served, under the router's own id
        client = client_of(redis_url)
        assert ([k async for k in client.scan_iter()], ledger.calls) == ([], [])
        await complete(_request())  # the caller's own id, unmarked
        assert [k async for k in client.scan_iter()] == [ledger_key("tenant-a", "req-1")]
        assert ledger.calls == ["claim", "record"]  # claimed once L1 missed, then recorded
        other, other_pipe, other_ledger = _router(redis_url)
        again = await other.Complete(_request(), FakeContext(RETRY))  # type: ignore[arg-type]
        assert again.replayed and other_pipe.runs == 0 and pipe.runs == 4
        await client.aclose()
        await ledger.close()
        await other_ledger.close()

    asyncio.run(run())


def test_a_claim_is_renewed_while_its_call_runs(redis_url: str) -> None:
    """The holder renews its claim every third of the lease (the sleeps injected: each tick is
    one renewal), and only its own claim."""

    async def run() -> None:
        ticks: asyncio.Queue[None] = asyncio.Queue()
        asleep: asyncio.Queue[float] = asyncio.Queue()  # each sleep begun (after a renewal)

        async def sleep(seconds: float) -> None:
            asleep.put_nowait(seconds)
            await ticks.get()

        client = client_of(redis_url)
        ledger = RedisAnswerLedger(client, ttl_s=60, lease_s=30, sleep=sleep)
        claimed = await ledger.claim("tenant-a", "req-9", "f" * 64)
        assert isinstance(claimed, Claimed)
        key = ledger_key("tenant-a", "req-9")
        assert 0 < await client.pttl(key) <= 30_000
        holding = asyncio.ensure_future(ledger.hold("tenant-a", "req-9", claimed))
        assert await asleep.get() == pytest.approx(10.0)
        await client.pexpire(key, 1_000)  # as if most of the lease had passed
        ticks.put_nowait(None)
        await asleep.get()  # renewed, and asleep again
        assert 1_000 < await client.pttl(key) <= 30_000
        assert isinstance(await ledger.claim("tenant-a", "req-9", "f" * 64), Running)
        await client.set(key, b"?" + b"f" * 64 + b"another router", px=1_000)
        ticks.put_nowait(None)
        await asyncio.wait_for(holding, 5)  # not its claim any more: it stops
        assert await client.pttl(key) <= 1_000  # and left the other one alone
        await ledger.close()

    asyncio.run(run())


class FailingRenewals(RedisAnswerLedger):
    """Its first ``failures`` renewals fail as a Redis that does not answer would."""

    def __init__(self, *args: Any, failures: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures
        renew = self._renew

        async def flaky(*a: Any, **kw: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise TimeoutError
            return await renew(*a, **kw)

        self._renew = flaky  # type: ignore[assignment]


def _virtual_time(
    sleeps: int = 1000,
) -> tuple[list[float], Callable[[float], Awaitable[None]], Callable[[], float]]:
    """Sleeps that only move a clock (each one recorded); past 100 s, or ``sleeps`` sleeps,
    the holder is cancelled."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if sum(slept) > 100 or len(slept) > sleeps:
            raise asyncio.CancelledError

    return slept, sleep, lambda: sum(slept)


def test_a_failed_renewal_is_retried_before_the_claim_lapses(redis_url: str) -> None:
    """Two renewals in a row fail: the next try comes well within the lease (not a third of
    it after each failure, which tried again only as the lease lapsed) and renews it."""

    async def run() -> None:
        slept, sleep, clock = _virtual_time(sleeps=3)
        client = client_of(redis_url)
        ledger = FailingRenewals(client, ttl_s=60, lease_s=30, sleep=sleep, clock=clock, failures=2)
        claimed = await ledger.claim("tenant-a", "req-r", "f" * 64)
        assert isinstance(claimed, Claimed)
        key = ledger_key("tenant-a", "req-r")
        await client.pexpire(key, 100_000)  # to tell the renewal's lease from the claim's
        with pytest.raises(asyncio.CancelledError):  # at the sleep after the third try
            await ledger.hold("tenant-a", "req-r", claimed)
        assert ledger.failures == 0 and await client.pttl(key) <= 30_000  # the third renewed
        assert sum(slept[:3]) < 30 * 0.5  # within half the lease of the claim


def _long_answer(request_id: str) -> pb.CompleteResponse:
    """A model's answer as the router records it: prose, usage, cost, ids."""
    words = ("the", "cache", "keeps", "each", "answer", "for", "one", "user", "while", "a", "model")
    draw = random.Random(request_id)
    text = " ".join(draw.choice(words) for _ in range(400))
    return pb.CompleteResponse(
        content=[pb.ContentBlock(text=text)],
        served_by=pb.LAYER_MODEL,
        model="sim-large",
        tier="large",
        stop_reason="end_turn",
        usage=pb.Usage(input_tokens=1200, output_tokens=400),
        trace_id="0123456789abcdef0123456789abcdef",
        request_id=request_id,
    )


def test_a_recorded_answer_is_stored_compressed_and_read_back_whole(redis_url: str) -> None:
    """Each billed answer lives in the shared Redis for ROUTER_IDEMPOTENCY_TTL_S (24 h): stored
    as its serialized bytes it was ~1.1 kB a request in Redis, ~14 GB a day at 100 req/s."""

    async def run() -> None:
        client = client_of(redis_url)
        ledger = RedisAnswerLedger(client, ttl_s=60)
        answer = _long_answer("req-z")
        await ledger.record("tenant-a", "req-z", "f" * 64, answer)
        stored = await client.get(ledger_key("tenant-a", "req-z"))
        assert isinstance(stored, bytes) and stored.startswith(b"f" * 64)
        assert len(stored) - 64 < answer.ByteSize() / 2
        recorded = await ledger.claim("tenant-a", "req-z", "f" * 64)
        assert recorded == Recorded("f" * 64, answer)
        await ledger.close()

    asyncio.run(run())


class Outage(RedisAnswerLedger):
    """A claim's lease kept on the injected clock (no Redis): a renewal tried while the clock is
    in one of ``down``'s spans fails as a Redis that is down would; one after renews the lease
    if it has not lapsed (the script's 1), else finds the claim gone (0). Each try's time is
    recorded."""

    def __init__(self, *args: Any, down: list[tuple[float, float]], **kwargs: Any) -> None:
        super().__init__(client_of("redis://127.0.0.1:1"), *args, **kwargs)
        self.tries: list[float] = []
        lapses = self._lease_s  # the claim, taken at 0

        async def renew(*a: Any, **kw: Any) -> int:
            nonlocal lapses
            now = self._clock()
            self.tries.append(now)
            if any(start <= now < end for start, end in down):
                raise RedisConnectionError(
                    "Error 111 connecting to redis:6379. Connection refused."
                )
            if now >= lapses:
                return 0
            lapses = now + self._lease_s
            return 1

        self._renew = renew  # type: ignore[assignment]


def _call_of(
    seconds: float,
) -> tuple[list[float], Callable[[float], Awaitable[None]], Callable[[], float]]:
    """Sleeps that only move a clock (each one recorded); the call ends (its holder cancelled)
    at ``seconds``."""
    slept: list[float] = []

    async def sleep(wait: float) -> None:
        slept.append(wait)
        if sum(slept) >= seconds:
            raise asyncio.CancelledError

    return slept, sleep, lambda: sum(slept)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_redis_outage_is_retried_less_and_less_often_and_given_up_before_the_lapse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down for 30 s under a call that runs 60 s: renewals were tried every 0.5 s (5 % of
    the 10 s lease) for the whole outage, 55 tries each in-flight call added to a struggling
    Redis, and 15 WARNING lines. A renewal after the lapse can only find the claim gone (the
    script renews only a claim still there and still this call's), so now: the wait doubles
    from 0.5 s up to the normal third, the last try 0.5 s before the lease lapses, then the
    claim is given up; its first failure and the give-up are logged."""
    caplog.set_level(logging.INFO, logger="services.router.answer_ledger")
    slept, sleep, clock = _call_of(60)
    ledger = Outage(ttl_s=60, sleep=sleep, clock=clock, down=[(0, 30)])
    asyncio.run(ledger.hold("tenant-a", "req-o", Claimed(b"?" + b"f" * 64 + b"t")))
    # tries at 3.33, 3.83, 4.83, 6.83 and 9.5 s: the claim lapses at 10 s
    assert slept == pytest.approx([10 / 3, 0.5, 1.0, 2.0, 9.5 - (10 / 3 + 3.5)])
    assert ledger.tries == pytest.approx([10 / 3, 10 / 3 + 0.5, 10 / 3 + 1.5, 10 / 3 + 3.5, 9.5])
    lines = _warnings(caplog)
    assert len(lines) == 2, lines  # its first failure, and the give-up
    assert "ConnectionError" in lines[0] and "req-o" in lines[0] and "tenant-a" in lines[0]
    assert "5 tries failed" in lines[1] and "another router" in lines[1]


def test_a_renewal_that_succeeds_again_restarts_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis back after a 5 s blip: renewed, and every third again; a later blip of the same
    claim is retried after 0.5 s again (not 4 s on from the first blip's backoff), counted but
    not logged a second time."""
    caplog.set_level(logging.INFO, logger="services.router.answer_ledger")
    slept, sleep, clock = _call_of(20)
    ledger = Outage(ttl_s=60, sleep=sleep, clock=clock, down=[(0, 5), (12, 14)])
    with pytest.raises(asyncio.CancelledError):  # the call's end
        asyncio.run(ledger.hold("tenant-a", "req-b", Claimed(b"?" + b"f" * 64 + b"t")))
    third = 10 / 3
    # failed at 3.33, 3.83, 4.83; renewed at 6.83, 10.17; failed at 13.5; renewed at 14, 17.33
    assert slept == pytest.approx([third, 0.5, 1.0, 2.0, third, third, 0.5, third, third])
    assert len(ledger.tries) == 8
    assert len(_warnings(caplog)) == 1


def test_a_record_written_uncompressed_before_is_still_read(redis_url: str) -> None:
    """Records written before the answers were compressed live out their TTL: still served."""

    async def run() -> None:
        client = client_of(redis_url)
        ledger = RedisAnswerLedger(client, ttl_s=60)
        for request_id, answer in (("old", _long_answer("old")), ("empty", pb.CompleteResponse())):
            key = ledger_key("tenant-a", request_id)
            await client.set(key, b"e" * 64 + answer.SerializeToString(), px=60_000)
            recorded = await ledger.claim("tenant-a", request_id, "e" * 64)
            assert recorded == Recorded("e" * 64, answer)
        await ledger.close()

    asyncio.run(run())


def test_a_record_that_does_not_read_costs_only_the_protection(redis_url: str) -> None:
    async def run() -> None:
        client = client_of(redis_url)
        ledger = RedisAnswerLedger(client, ttl_s=60)
        await client.set(ledger_key("tenant-a", "bad"), b"e" * 64 + b"\0not zlib", px=60_000)
        with pytest.raises(LedgerUnavailable, match="does not read"):
            await ledger.claim("tenant-a", "bad", "e" * 64)
        await ledger.close()

    asyncio.run(run())


class TracedPipeline(FakePipeline):
    """Answers as the real pipeline heads them: in the trace of the call that runs it."""

    async def run(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        streamed: bool = True,
        time_remaining_s: float | None = None,
        charge: Charge | None = None,
        bills: Bills | None = None,
        answer_billed: AnswerBilled | None = None,
        retried: bool = False,
        before_model: BeforeModel | None = None,
        model_sent: ModelSent | None = None,
        model_refused: ModelRefused | None = None,
        late_bill: LateBill | None = None,
    ) -> AsyncIterator[pb.CompleteChunk]:
        context = trace.get_current_span().get_span_context()
        run = super().run(
            tenant,
            request,
            streamed,
            time_remaining_s,
            before_model=before_model,
            model_sent=model_sent,
            model_refused=model_refused,
        )
        async for chunk in run:
            kind = chunk.WhichOneof("part")
            if kind != "delta":
                part = chunk.start if kind == "start" else chunk.end
                part.trace_id = format(context.trace_id, "032x")
                part.span_id = format(context.span_id, "016x")
            yield chunk


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-router", "other-router"])
def test_a_replayed_answer_says_so_on_the_response_and_on_its_span(
    redis_url: str, streamed: bool, elsewhere: bool
) -> None:
    """A retry served the first call's answer (no model call, no new bill) was told nothing of
    it: the same cost again (a client summing costs counted it twice) and a bare span. Now the
    response is marked ``replayed`` and the retry's span names the tenant, the id, the layer,
    ``cachemesh.replayed`` and links the first call's span; it carries no cost of its own."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")

    async def call(servicer: GatewayServicer, *mark: tuple[str, str]) -> pb.CompleteResponse:
        with tracer.start_as_current_span("/cachemesh.v1.Gateway/Complete"):
            if not streamed:
                return await servicer.Complete(_request(), FakeContext(*mark))  # type: ignore[arg-type]
            chunks = [
                c
                async for c in servicer.StreamComplete(_request(), FakeContext(*mark))  # type: ignore[arg-type]
            ]
            start, end = chunks[0], chunks[-1]
            assert start.start.replayed == end.end.replayed
            assert start.start.span_id == end.end.span_id
            return end.end

    async def run() -> None:
        first, first_pipe, first_ledger = _router(redis_url, pipeline=TracedPipeline())
        second, second_pipe, second_ledger = _router(redis_url, pipeline=TracedPipeline())
        answer = await call(first)
        again = await call(second if elsewhere else first, RETRY)
        assert (first_pipe.runs, second_pipe.runs) == (1, 0)
        assert not answer.replayed and again.replayed
        # the rest is the first answer: its content, layer, cost (billed once) and its trace
        assert _replay_of(answer, again)
        served, replayed = exported.get_finished_spans()
        assert served.attributes is not None and replayed.attributes is not None
        assert "cachemesh.replayed" not in served.attributes
        assert {k: v for k, v in replayed.attributes.items() if k.startswith("cachemesh.")} == {
            "cachemesh.replayed": True,
            "cachemesh.tenant": "tenant-a",
            "cachemesh.request_id": "req-1",
            "cachemesh.requested_model": "sim-small",
            "cachemesh.served_by": "LAYER_MODEL",
            "cachemesh.model": "sim-small",
            "cachemesh.tier": "",
        }
        (link,) = replayed.links
        assert link.context.trace_id == served.context.trace_id
        assert link.context.span_id == served.context.span_id
        assert replayed.context.trace_id != served.context.trace_id
        for ledger in (first_ledger, second_ledger):
            await ledger.close()

    asyncio.run(run())


def test_an_answer_recorded_before_it_carried_its_span_id_links_its_trace() -> None:
    """A ledger answer written by a router of the version before has a trace id, no span id:
    the replay still links that trace (span id 0, kept by the link's attribute)."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    old = pb.CompleteResponse(trace_id="ab" * 16, served_by=pb.LAYER_MODEL)
    with provider.get_tracer("test").start_as_current_span("retry") as span:
        spans.replay_attributes(span, old)
    (link,) = exported.get_finished_spans()[0].links
    assert (link.context.trace_id, link.context.span_id) == (int("ab" * 16, 16), 0)


@pytest.mark.parametrize("over_limit", [True, False])
def test_a_refused_request_names_its_tenant_on_its_root_span(over_limit: bool) -> None:
    """A request refused over its limits, or as invalid, ended with a root span naming no
    tenant: who was refused was not in the trace."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")

    async def run() -> None:
        rate = UniformPolicies(LimitPolicy(requests_per_min=1))
        servicer, pipeline = _servicer(Limiter(MemoryLimitStore(), rate, SystemClock(), no_prompt))
        if over_limit:  # the minute's one request
            used = build_request("Admitted", model="sim-small", request_id="admitted")
            await servicer.Complete(used, FakeContext())  # type: ignore[arg-type]
            pipeline.runs = 0
        request = build_request("Refused?", model="sim-small", request_id="refused-1")
        if not over_limit:
            request.max_tokens = 0  # invalid
        context = FakeContext()
        with tracer.start_as_current_span("/cachemesh.v1.Gateway/Complete"), pytest.raises(Aborted):
            await servicer.Complete(request, context)  # type: ignore[arg-type]
        refused = (
            grpc.StatusCode.RESOURCE_EXHAUSTED if over_limit else grpc.StatusCode.INVALID_ARGUMENT
        )
        assert context.status == refused and pipeline.runs == 0
        [root] = exported.get_finished_spans()
        attributes = root.attributes or {}
        assert attributes.get("cachemesh.tenant") == "tenant-a"
        assert attributes.get("cachemesh.request_id") == ("refused-1" if over_limit else None)

    asyncio.run(run())


LEDGER_FAILURES = "cachemesh_router_answer_ledger_failures_total"


def _ledger_failures(registry: CollectorRegistry) -> dict[str, float]:
    """The failure counter's value for each operation (every one exposed, from 0)."""
    counts: dict[str, float] = {}
    for operation in ("claim", "renew", "record", "give_back"):
        found = registry.get_sample_value(LEDGER_FAILURES, {"operation": operation})
        assert found is not None, f"{operation} not exposed"
        counts[operation] = found
    return counts


async def _refused(*args: Any, **kwargs: Any) -> Any:
    raise RedisConnectionError("Error 111 connecting to redis:6379. Connection refused.")


async def _hangs(*args: Any, **kwargs: Any) -> Any:
    await asyncio.Event().wait()  # a Redis that never answers


@pytest.mark.parametrize(
    ("script", "fault", "pipeline_fails", "operation"),
    [
        ("_take", _refused, False, "claim"),
        ("_take", _hangs, False, "claim"),  # past LEDGER_TIMEOUT_S, in the servicer
        ("_record", _refused, False, "record"),
        ("_give_back", _refused, True, "give_back"),  # a call that failed gives its claim back
    ],
)
def test_each_failed_ledger_call_counts_once_under_its_operation(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    script: str,
    fault: Callable[..., Awaitable[Any]],
    pipeline_fails: bool,
    operation: str,
) -> None:
    """A ledger failure costs a request its protection across routers (a retry elsewhere may
    be billed again): it was only logged, so no alert could tell a ledger Redis that fails.
    Now each failed call counts once in ``cachemesh_router_answer_ledger_failures_total``
    under its operation, and the request is served all the same. The ledger's other calls go
    to a real Redis under the servicer's LEDGER_TIMEOUT_S: made 0.05 s for every case, a loaded
    machine timed one of them out too, counted beside the fault (3 runs of 30 beside 3 busy
    loops); it is shortened only where the fault is a hang, to keep that case quick."""
    if fault is _hangs:
        monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", 0.05)

    async def run() -> None:
        registry = new_registry()
        metrics = RouterMetrics(registry, TenantLabels(1))
        ledger = RedisAnswerLedger(client_of(redis_url), ttl_s=60)
        setattr(ledger, script, fault)
        pipeline = GatedPipeline(fails=pipeline_fails)
        servicer = gateway_servicer(
            pipeline,
            {KEY: "tenant-a"},
            metrics=metrics,
            ledger=ledger,
            ledger_failed=metrics.ledger_failed,
        )
        assert set(_ledger_failures(registry).values()) == {0.0}
        context = FakeContext(CLIENT_MARK)
        if pipeline_fails:
            with pytest.raises(Aborted):
                await servicer.Complete(_request(), context)  # type: ignore[arg-type]
        else:
            answer = await servicer.Complete(_request(), context)  # type: ignore[arg-type]
            assert answer.content[0].text == "answer 1"
        await asyncio.gather(*servicer._background)  # the claim given back, after the call
        counts = _ledger_failures(registry)
        assert counts == {op: float(op == operation) for op in counts}, counts
        await ledger.close()

    asyncio.run(run())


def test_each_failed_renewal_try_counts_once() -> None:
    """Redis down for 30 s under a 60 s call: five renewal tries fail (3.3 to 9.5 s), then the
    claim is given up: five renewal failures counted, nothing else."""
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(1))
    _, sleep, clock = _call_of(60)
    ledger = Outage(
        ttl_s=60, sleep=sleep, clock=clock, down=[(0, 30)], failed=metrics.ledger_failed
    )
    asyncio.run(ledger.hold("tenant-a", "req-o", Claimed(b"?" + b"f" * 64 + b"t")))
    assert len(ledger.tries) == 5
    assert _ledger_failures(registry) == {"claim": 0, "renew": 5, "record": 0, "give_back": 0}


LEDGER_PASSWORD = "Ledger-S3cret"
# the built ledger's wait: a late answer is taken for a Redis that does not answer (fail-open)
PATIENT_S = 10.0


async def test_a_router_started_while_its_ledger_redis_is_down_records_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer ledger's Redis is down as the router starts (a restart during an outage).
    Before, the router refused to start (ConfigError, exit 2) and the whole Gateway was down
    until Redis came back. Now one WARNING names that Redis (not its password), its calls fail
    as at run time (the request served without the protection), and once Redis answers the
    ledger claims and records there."""
    port = free_port()
    url = f"redis://:{LEDGER_PASSWORD}@127.0.0.1:{port}/2"
    ledger = await build_answer_ledger(url, 60, 4, 0.5, lambda operation: None)
    assert ledger is not None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ROUTER_ANSWERS_REDIS_URL" in w and f"127.0.0.1:{port}/2" in w for w in warned), (
        warned
    )
    assert all(LEDGER_PASSWORD not in r.getMessage() for r in caplog.records)
    with pytest.raises(LedgerUnavailable):
        await ledger.claim("tenant-a", "req-down", "f" * 64)
    with redis_server(tmp_path, port=port) as server:
        await require_password(server, LEDGER_PASSWORD)
        assert isinstance(await ledger.claim("tenant-a", "req-up", "f" * 64), Claimed)
        assert isinstance(await ledger.claim("tenant-a", "req-up", "f" * 64), Running)
        await ledger.close()


async def test_a_ledger_redis_that_does_not_answer_at_start_up_delays_it_only_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung Redis (takes the connection, never answers): the start-up waits for it at most
    the ledger's own timeout, then goes on without it (before: it waited forever)."""
    hole = BlackHole()
    try:
        url = hole.endpoint.replace("http://", "redis://") + "/2"
        ledger = await asyncio.wait_for(
            build_answer_ledger(url, 60, 4, 0.5, lambda operation: None), timeout=20
        )
        assert ledger is not None
        assert any(
            r.levelno == logging.WARNING and "ROUTER_ANSWERS_REDIS_URL" in r.getMessage()
            for r in caplog.records
        )
        await ledger.close()
    finally:
        hole.close()


async def test_a_wrong_password_for_the_ledger_redis_still_stops_the_router(
    tmp_path: Path,
) -> None:
    """Redis answers but refuses the credentials: a configuration error, not an outage to
    wait out, so the router stops naming the variable and that Redis (no password)."""
    with redis_server(tmp_path) as server:
        await require_password(server, LEDGER_PASSWORD)
        url = server.replace("redis://", "redis://:Not-The-Password@")
        with pytest.raises(ConfigError) as refused:
            await build_answer_ledger(url, 60, 4, PATIENT_S, lambda operation: None)
    message = str(refused.value)
    assert message.startswith("ROUTER_ANSWERS_REDIS_URL: ") and "redis://:***@127.0.0.1" in message
    assert "Not-The-Password" not in message


def test_a_duplicate_that_waited_runs_with_what_is_left_of_its_deadline() -> None:
    """A duplicate waits on a first call until its caller's deadline cuts it, then runs as a
    new call: with what is left of its own deadline, not what it had when it came (the router's
    model timeout, its reply margin and a deadline cut's bill all read it). Before, it ran with
    its whole 2 s after waiting 0.3 s of it."""

    class Deadlined(FakeContext):
        def __init__(self, remaining_s: float) -> None:
            super().__init__()
            self.until = time.monotonic() + remaining_s

        def time_remaining(self) -> float:
            return self.until - time.monotonic()

    class FirstCut(FakePipeline):
        def __init__(self) -> None:
            super().__init__()
            self.given: list[float | None] = []

        async def run(
            self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
        ) -> AsyncIterator[pb.CompleteChunk]:
            self.given.append(kwargs.get("time_remaining_s"))
            if len(self.given) == 1:
                await asyncio.sleep(0.3)  # until its caller's deadline cuts it
                raise RequestError(Code.DEADLINE_EXCEEDED, "the request's deadline passed")
            for chunk in chunks_of(pb.CompleteResponse(request_id=request.request_id)):
                yield chunk

    async def run() -> None:
        servicer, _ = _servicer(memory_limiter())
        pipeline = FirstCut()
        servicer._pipeline = pipeline  # type: ignore[assignment]
        request = build_request("Once", model="sim-small", request_id="dl")
        first = asyncio.ensure_future(servicer.Complete(request, Deadlined(0.3)))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        duplicate = servicer.Complete(request, Deadlined(2.0))  # type: ignore[arg-type]
        outcomes = await asyncio.gather(first, duplicate, return_exceptions=True)
        assert isinstance(outcomes[1], pb.CompleteResponse) and not outcomes[1].replayed
        given = pipeline.given[1]
        assert given is not None and given <= 2.0 - 0.3  # at least the wait's 0.3 s gone

    asyncio.run(run())
