"""A Gateway call that ends before its first model call was sent used no model tokens: its
limits' reservation (prompt + max_tokens) goes back whole, whether its caller cancelled it
during the limits' admit, its L1 Lookup, a wait on an identical request's call (L1's single
flight) or its Plan. Once a model call was sent, a cut call is billed what the model produced,
as before. And a duplicate of a request_id waiting on a first call whose caller cancelled it
runs as a new call, where it was told UNAVAILABLE "the first call ... failed; retry it".

The real servicer, pipeline and limiter (its store a real Redis on a clock that does not move:
no refill blurs the counts); L1, prefix-cache and the model replicas are fakes that stop where a
test holds them, so each cancel lands where it says (events, no sleeps).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from redis.asyncio import Redis

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.env import Env
from services.router.dependencies import Dependencies
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import TOKENS, LimitPolicy, Refusal, UniformPolicies
from services.router.limit_store import Admission
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.pipeline import Pipeline
from services.router.redis_limits import RedisLimitStore
from services.router.routing.model import RouterCard, load_router_model
from services.router.servicer import GatewayServicer
from services.router.settings import RouterSettings
from tests.redis_server import client_of
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY, Aborted, FakeContext, GatedPipeline
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeSemantic,
    FakeStream,
)

TENANT = "tenant-a"
PROMPT_TOKENS = 10  # the limits' count of the prompt
MAX_TOKENS = 512
RESERVED = PROMPT_TOKENS + MAX_TOKENS
TOKENS_PER_MIN = 60_000
PLANNED_PROMPT = 40  # the fake Plan's, and so the model call's bill
# the limits store's wait: the service's 0.5 s fails open (admits unreserved) under load
PATIENT_S = 10.0


def _settings() -> RouterSettings:
    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
            "CACHEMESH_API_KEYS_FILE": "/nonexistent",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "ROUTER_SEMANTIC_LEASE_WAIT_S": "30",  # a pending Lookup waits on the leader
        }
    )
    return RouterSettings.from_env(env, TABLE)


@dataclass
class HeldSemantic(FakeSemantic):
    """L1: a miss, once ``gate`` opens (``entered``: a Lookup waits on it). ``pending``: the
    first Lookup finds an identical request's model call in flight, and the second one (the
    single-flight wait) is the one held."""

    pending: bool = False
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        self.lookups.append(request)
        if self.pending and len(self.lookups) == 1:
            return sc.LookupResponse(pending=True)
        self.entered.set()
        await self.gate.wait()
        return sc.LookupResponse()


@dataclass
class HeldPrefix(FakePrefix):
    """prefix-cache whose Plan answers once ``gate`` opens (``entered``: one waits on it)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        self.entered.set()
        await self.gate.wait()
        return await super().plan(request, deadline_s)


class HeldStream(FakeStream):
    """A model's answer that stops after its first token until ``gate`` opens."""

    def __init__(self, gate: asyncio.Event, held: asyncio.Event) -> None:
        super().__init__([])
        self._gate = gate
        self._held = held
        self._chunks_left = [
            model_pb2.GenerateChunk(
                start=model_pb2.GenerateStart(replica="large-1", prompt_tokens=PLANNED_PROMPT)
            ),
            model_pb2.GenerateChunk(text="Hello"),
            None,  # held here
            model_pb2.GenerateChunk(text=" there."),
            model_pb2.GenerateChunk(
                end=model_pb2.GenerateEnd(output_tokens=3, stop_reason="end_turn")
            ),
        ]

    async def read(self) -> model_pb2.GenerateChunk | None:
        while self._chunks_left:
            chunk = self._chunks_left.pop(0)
            if chunk is not None:
                return chunk
            self._held.set()
            await self._gate.wait()
        return None


@dataclass
class HeldModels(FakeModels):
    """Replicas whose answers stop after the first token until ``gate`` opens (``held``: an
    answer stopped there)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        return HeldStream(self.gate, self.held)


class WatchedTable(IdempotencyTable):
    """The answer-once table, telling when duplicates wait on a first call (``waited``)."""

    def __init__(self) -> None:
        super().__init__(ManualClock(), 60, 100)
        self._waits = 0
        self._waited = asyncio.Event()

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        claimed, future = super().claim(*args, **kwargs)
        if not claimed:
            self._waits += 1
            self._waited.set()
        return claimed, future

    async def waited(self, waits: int = 1) -> None:
        """Until ``waits`` calls in all have waited on a first call."""
        while self._waits < waits:
            self._waited.clear()
            await asyncio.wait_for(self._waited.wait(), 10)


class AnsweredLate(RedisLimitStore):
    """A store whose admit's reply comes once ``gate`` opens, after Redis took the
    reservation (``entered``): the caller may leave while it is on the way."""

    def __init__(self, client: Redis) -> None:
        super().__init__(client, server_time=False)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def admit(self, asked: Admission) -> Refusal | None:
        refusal = await super().admit(asked)
        self.entered.set()
        await self.gate.wait()
        return refusal


@dataclass
class Router:
    servicer: GatewayServicer
    pipeline: Pipeline
    limiter: Limiter
    table: WatchedTable
    redis: Redis
    semantic: FakeSemantic
    prefix: FakePrefix
    models: FakeModels

    async def level(self) -> float:
        """The tenant's token bucket, once every count reached the store."""
        await self.pipeline.drain_bills()  # the bills of calls cut, charged to the limits
        await self.limiter.drain()
        level = await self.redis.hget(f"cachemesh:limits:{{{TENANT}}}:{TOKENS}", "level")
        return TOKENS_PER_MIN if level is None else float(level)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = client_of(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def _router(
    redis: Redis,
    semantic: FakeSemantic | None = None,
    prefix: FakePrefix | None = None,
    models: FakeModels | None = None,
    store: RedisLimitStore | None = None,
    policy: LimitPolicy | None = None,
    cost_bound: Callable[[pb.CompleteRequest, int], int] | None = None,
) -> Router:
    semantic = semantic if semantic is not None else FakeSemantic()
    prefix = prefix if prefix is not None else FakePrefix()
    models = models if models is not None else HeldModels()
    pipeline = Pipeline(
        Dependencies(semantic, prefix, models, dict(REPLICAS)),
        TABLE,
        TOKENIZER,
        trace.NoOpTracer(),
        _settings(),
        (load_router_model(), RouterCard.load().default_threshold, None),
        clock=FakeClock(),
        wall=ManualClock(),
    )
    limiter = Limiter(
        store if store is not None else RedisLimitStore(redis, server_time=False),
        UniformPolicies(policy or LimitPolicy(tokens_per_min=TOKENS_PER_MIN)),
        ManualClock(),  # frozen: no refill
        lambda request: PROMPT_TOKENS,
        cost_bound=cost_bound,
        timeout_s=PATIENT_S,  # a loaded machine's late admit is admitted unreserved (fail-open)
    )
    table = WatchedTable()
    servicer = gateway_servicer(pipeline, {KEY: TENANT}, answers=table, limiter=limiter)
    return Router(servicer, pipeline, limiter, table, redis, semantic, prefix, models)


def _grpc(context: FakeContext) -> Any:
    """The fake as the servicer's gRPC context (it has what the servicer reads of one)."""
    return context


def _request() -> pb.CompleteRequest:
    return build_request(
        "How do I reset my password?", model="sim-large", max_tokens=MAX_TOKENS, request_id="r1"
    )


async def _cancelled_at(router: Router, reached: asyncio.Event) -> None:
    """A Complete call whose caller leaves once it reached ``reached``."""
    call = asyncio.ensure_future(router.servicer.Complete(_request(), _grpc(FakeContext())))
    await asyncio.wait_for(reached.wait(), 10)
    assert not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_a_call_cancelled_during_its_l1_lookup_gives_its_reservation_back(
    redis: Redis,
) -> None:
    """Before: it kept its 522 tokens for a call that never reached a model."""
    semantic = HeldSemantic()
    router = _router(redis, semantic=semantic)
    await _cancelled_at(router, semantic.entered)
    assert await router.level() == TOKENS_PER_MIN
    assert router.prefix.plans == [] and router.models.calls == []


async def test_a_call_cancelled_while_it_waits_on_an_identical_requests_call_gives_it_back(
    redis: Redis,
) -> None:
    """L1's single flight: its Lookup waits on the lease of an identical request's call."""
    semantic = HeldSemantic(pending=True)
    router = _router(redis, semantic=semantic)
    await _cancelled_at(router, semantic.entered)
    assert len(semantic.lookups) == 2  # the second one waited
    assert await router.level() == TOKENS_PER_MIN
    assert router.models.calls == []


async def test_a_call_cancelled_during_its_plan_gives_its_reservation_back(redis: Redis) -> None:
    prefix = HeldPrefix()
    router = _router(redis, prefix=prefix)
    await _cancelled_at(router, prefix.entered)
    assert await router.level() == TOKENS_PER_MIN
    assert router.models.calls == []


async def test_a_call_cancelled_while_its_admit_is_on_the_way_gives_its_reservation_back(
    redis: Redis,
) -> None:
    """Redis took the reservation, and the caller left before its reply was read: the reply
    is still read (in the background), and the reservation given back."""
    store = AnsweredLate(redis)
    router = _router(redis, store=store)
    call = asyncio.ensure_future(router.servicer.Complete(_request(), _grpc(FakeContext())))
    await asyncio.wait_for(store.entered.wait(), 10)
    assert await router.level() == TOKENS_PER_MIN - RESERVED  # taken, the reply on its way
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    store.gate.set()
    assert await router.level() == TOKENS_PER_MIN
    assert router.semantic.lookups == [] and router.models.calls == []


async def test_a_call_cancelled_during_its_models_answer_is_billed_what_it_produced(
    redis: Redis,
) -> None:
    """Once the model call was sent, as before: the bill of what the model produced (its
    prompt and the token it gave) replaces the reservation."""
    models = HeldModels()
    router = _router(redis, models=models)
    await _cancelled_at(router, models.held)
    level = await router.level()
    final = [c for c in router.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert len(final) == 1 and final[0].output_tokens >= 1
    assert level == TOKENS_PER_MIN - PLANNED_PROMPT - final[0].output_tokens


@dataclass
class HeldFinalPrefix(FakePrefix):
    """prefix-cache whose FINAL (a cut call's bill) answers once ``gate`` opens."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Event = field(default_factory=asyncio.Event)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_FINAL:
            self.final.set()
            await self.gate.wait()
        return await super().commit(request, deadline_s)


async def test_a_call_cancelled_during_its_models_answer_holds_its_budget_until_its_bill(
    redis: Redis,
) -> None:
    """A budgeted tenant's call cut mid-answer released its budget hold at its end, before its
    bill (the FINAL, in the background) was counted: admits in between saw neither (10
    admitted one after another, 43,500,000 nanos spent on a 10,000,000 budget). Now the hold
    goes with the bill."""
    models, prefix = HeldModels(), HeldFinalPrefix()
    router = _router(
        redis,
        prefix=prefix,
        models=models,
        policy=LimitPolicy(day_budget_nanos=10_000_000),
        cost_bound=lambda request, prompt: 1_000_000,  # its largest bill, held while it runs
    )
    held = f"cachemesh:limits:{{{TENANT}}}:held"
    await _cancelled_at(router, models.held)
    await asyncio.wait_for(prefix.final.wait(), 10)  # its bill is on its way
    await router.limiter.drain()
    assert await redis.zcard(held) == 1  # before: 0, the hold gone ahead of the bill
    prefix.gate.set()
    await router.pipeline.drain_bills()
    for _ in range(10):  # the release follows the charge's count, a few loop turns later
        await router.limiter.drain()
        await asyncio.sleep(0)
    assert await redis.zcard(held) == 0
    keys = [key.decode() async for key in redis.scan_iter(match=f"*{TENANT}*")]
    spent = sorted(key for key in keys if ":spent:" in key)
    assert spent, keys
    assert [int(await redis.get(key) or 0) for key in spent] == [123, 123]  # day, month


async def test_an_answered_call_and_an_l1_hit_count_as_before(redis: Redis) -> None:
    """A model's answer counts its usage (prompt 40 + 3 output); an L1 hit counts none."""
    models = HeldModels()
    models.gate.set()
    router = _router(redis, models=models)
    end = await router.servicer.Complete(_request(), _grpc(FakeContext()))
    assert end.served_by == pb.LAYER_MODEL
    assert await router.level() == TOKENS_PER_MIN - PLANNED_PROMPT - 3
    hit = sc.CachedAnswer(
        content=[pb.ContentBlock(text="Use the reset link.")],
        model="sim-large",
        tier="large",
        stop_reason="end_turn",
    )
    router.semantic.reply = sc.LookupResponse(hit=True, answer=hit)
    again = build_request("Another?", model="sim-large", max_tokens=MAX_TOKENS, request_id="r2")
    end = await router.servicer.Complete(again, _grpc(FakeContext()))
    assert end.served_by == pb.LAYER_SEMANTIC_CACHE
    assert await router.level() == TOKENS_PER_MIN - PLANNED_PROMPT - 3


async def _stream(
    router: Router, context: FakeContext, token: asyncio.Event
) -> pb.CompleteResponse:
    """A StreamComplete call of ``_request``: its end (``token``: its first token came)."""
    async for chunk in router.servicer.StreamComplete(_request(), _grpc(context)):
        if chunk.WhichOneof("part") == "delta":
            token.set()
        if chunk.WhichOneof("part") == "end":
            return chunk.end
    raise AssertionError("the stream ended without its end")


async def test_a_duplicate_waiting_on_a_cancelled_call_runs_as_a_new_call(redis: Redis) -> None:
    """The review's repro, its ordering held: the caller cancels its stream at the first
    token and sends the same request_id again at once, before the router saw the cancel, so
    the repeat waits on the first call. Before: UNAVAILABLE "the first call with request_id
    'r1' failed; retry it" (1 in 10 tries in the review); now it is a new model call."""
    models = HeldModels()
    router = _router(redis, models=models)
    first_token = asyncio.Event()
    first = asyncio.ensure_future(_stream(router, FakeContext(), first_token))
    await asyncio.wait_for(first_token.wait(), 10)
    repeat_context = FakeContext()
    repeat = asyncio.ensure_future(_stream(router, repeat_context, asyncio.Event()))
    await router.table.waited()  # it waits on the first call
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    models.gate.set()  # the repeat's own model call answers
    end = await asyncio.wait_for(repeat, 10)
    assert repeat_context.status is None
    assert not end.replayed and end.served_by == pb.LAYER_MODEL
    assert len(models.calls) == 2  # the cancelled call's, and the repeat's own


async def test_two_duplicates_waiting_on_a_cancelled_call_make_one_new_call(
    redis: Redis,
) -> None:
    """One takes the id and runs; the other waits on it and gets its answer, replayed."""
    models = HeldModels()
    router = _router(redis, models=models)
    first_token = asyncio.Event()
    first = asyncio.ensure_future(_stream(router, FakeContext(), first_token))
    await asyncio.wait_for(first_token.wait(), 10)
    contexts = (FakeContext(), FakeContext())
    repeats = [
        asyncio.ensure_future(router.servicer.Complete(_request(), _grpc(c))) for c in contexts
    ]
    await router.table.waited(2)  # both wait on the first call
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    models.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*repeats), 10)
    assert [c.status for c in contexts] == [None, None]
    assert sorted(a.replayed for a in answers) == [False, True]
    assert len(models.calls) == 2


async def test_a_duplicate_waiting_on_a_failed_call_is_told_it_failed() -> None:
    """Only a failure of the first call itself answers its waiting duplicate: UNAVAILABLE,
    retry it (a first call that fails is not its caller leaving)."""
    gate = asyncio.Event()
    pipeline = GatedPipeline(gate, fails=True)
    table = WatchedTable()
    limiter = Limiter(
        MemoryLimitStore(),
        UniformPolicies(LimitPolicy()),
        ManualClock(),
        lambda request: PROMPT_TOKENS,
    )
    servicer = gateway_servicer(pipeline, {KEY: TENANT}, answers=table, limiter=limiter)
    contexts = (FakeContext(), FakeContext())
    first = asyncio.ensure_future(servicer.Complete(_request(), _grpc(contexts[0])))
    await asyncio.wait_for(pipeline.started.wait(), 10)
    duplicate = asyncio.ensure_future(servicer.Complete(_request(), _grpc(contexts[1])))
    await table.waited()
    gate.set()
    outcomes = await asyncio.gather(first, duplicate, return_exceptions=True)
    assert all(isinstance(o, Aborted) for o in outcomes)
    assert [c.status for c in contexts] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert "failed; retry it" in contexts[1].message and pipeline.runs == 1
