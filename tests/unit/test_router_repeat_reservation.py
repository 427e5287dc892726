"""An unmarked repeat of a request_id (no ``cachemesh-retry`` mark) that reaches a second
router while the first router's call holds the id's claim in the answer ledger waits there,
admitted by the limits already (its prompt + max_tokens reserved). A wait that ends with no
model call of its own (the first call's answer replayed, its caller's cancel, its deadline)
gives that reservation back; a wait that ends in a take-over (the first router's claim lapsed)
makes the model call, and its reservation counts as any model call's does.

Two real grpc.aio servers (a caller's cancel and its deadline reach the handler as in
production), one real Redis holding both the answer ledger and the limits' buckets
(``RedisLimitStore`` on an injected clock that does not move: no refill blurs the counts);
the pipelines are fakes that await ``before_model`` as the real one does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.clock import ManualClock
from services.router import servicer as servicer_module
from services.router.answer_ledger import Claimed, Recorded, RedisAnswerLedger, Running, ledger_key
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import TOKENS, LimitPolicy, UniformPolicies
from services.router.limits import Limiter
from services.router.pipeline import chunks_of
from services.router.redis_limits import RedisLimitStore
from services.router.servicer import GatewayServicer
from tests.redis_server import client_of
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import Aborted, FakeContext

KEY = "k-test-0123456789"
TENANT = "tenant-a"
PROMPT_TOKENS = 10
MAX_TOKENS = 512
RESERVED = PROMPT_TOKENS + MAX_TOKENS  # 522, as in the review's repro
USED = PROMPT_TOKENS + 30  # the fake model's answer
TOKENS_PER_MIN = 100_000
ENDED_S = 2.0  # a cancelled call's handler ends within this (at once, unless its cancel is lost)
METHODS = ["Complete", "StreamComplete"]
PATIENT_S = 10.0  # the ledger's and limits store's waits: the services' 0.5 s fails open under load


@pytest.fixture(autouse=True)
def _patient_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded test machine may take longer than the service's 0.5 s to answer."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", PATIENT_S)


class Pipeline:
    """A model call (billed: usage and cost) that runs until ``gate`` opens; it awaits
    ``before_model`` first and serves what that returns instead, as the real pipeline does.
    ``task``: the handler's task (the one gRPC cancels), once the call reached it."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.runs = 0
        self.replays = 0
        self.started = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None

    async def run(
        self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
    ) -> AsyncIterator[pb.CompleteChunk]:
        self.task = asyncio.current_task()
        before_model = kwargs.get("before_model")
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
        answer = pb.CompleteResponse(
            served_by=pb.LAYER_MODEL,
            model=request.model,
            request_id=request.request_id,
            usage=pb.Usage(input_tokens=PROMPT_TOKENS, output_tokens=USED - PROMPT_TOKENS),
            cost=pb.Cost(cost_nanos=160_000),
        )
        answer.content.add(text=f"answer {self.runs}")
        for chunk in chunks_of(answer):
            yield chunk


class WatchedLedger(RedisAnswerLedger):
    """A real ledger that tells when a claim found another router's call holding the id
    (``waiting``); ``cancel_at_reply``: the task cancelled just as such a claim's reply is in
    (before the call that asked reads it), as a caller's cancel may land at any instant;
    ``drops_it``: that cancel is then dropped under the claim, as redis-py's ``wait_for`` drops
    one on Python 3.11 (``services.common.background``)."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis, ttl_s=60)
        self.waiting = asyncio.Event()
        self.cancel_at_reply: asyncio.Task[Any] | None = None
        self.drops_it = False

    async def claim(self, tenant: str, request_id: str, fingerprint: str, *mine: Any) -> Any:
        found = await super().claim(tenant, request_id, fingerprint, *mine)
        if isinstance(found, Running):
            self.waiting.set()
            if self.cancel_at_reply is not None:
                self.cancel_at_reply.cancel()
                self.cancel_at_reply = None
                if self.drops_it:
                    with contextlib.suppress(asyncio.CancelledError):  # thrown nothing more
                        await asyncio.sleep(0)
        assert isinstance(found, Claimed | Running | Recorded)
        return found


@dataclass
class Router:
    servicer: GatewayServicer
    pipeline: Pipeline
    ledger: WatchedLedger
    limiter: Limiter
    stub: gateway_pb2_grpc.GatewayAsyncStub


@dataclass
class Routers:
    first: Router
    second: Router
    redis: Redis
    gate: asyncio.Event  # the first router's model call answers once it opens

    async def level(self) -> float:
        """The tenant's token bucket, once both routers' counts reached the store."""
        for router in (self.first, self.second):
            await router.limiter.drain()
        level = await self.redis.hget(f"cachemesh:limits:{{{TENANT}}}:{TOKENS}", "level")
        return TOKENS_PER_MIN if level is None else float(level)


@asynccontextmanager
async def _router(redis_url: str, pipeline: Pipeline, clock: ManualClock) -> AsyncIterator[Router]:
    policy = LimitPolicy(tokens_per_min=TOKENS_PER_MIN)
    store = RedisLimitStore(client_of(redis_url), server_time=False)
    limiter = Limiter(
        store,
        UniformPolicies(policy),
        clock,
        lambda request: PROMPT_TOKENS,
        timeout_s=PATIENT_S,  # a loaded machine's late admit is admitted unreserved (fail-open)
    )
    ledger = WatchedLedger(client_of(redis_url))
    answers = IdempotencyTable(clock, 60, 100)
    servicer = gateway_servicer(
        pipeline, {KEY: TENANT}, answers=answers, limiter=limiter, ledger=ledger
    )
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            yield Router(servicer, pipeline, ledger, limiter, stub)
    finally:
        await server.stop(None)
        await servicer.handlers_ended(ENDED_S)
        await limiter.close()
        await ledger.close()


@pytest.fixture
async def routers(redis_url: str) -> AsyncIterator[Routers]:
    """Two routers sharing one Redis (emptied first) for their ledger and their limits."""
    redis = client_of(redis_url)
    await redis.flushdb()
    clock = ManualClock()
    gate = asyncio.Event()
    async with (
        _router(redis_url, Pipeline(gate), clock) as first,
        _router(redis_url, Pipeline(), clock) as second,
    ):
        try:
            yield Routers(first, second, redis, gate)
        finally:
            gate.set()
            await redis.aclose()


def _request() -> pb.CompleteRequest:
    return build_request(
        "What is a KV cache?", model="sim-small", max_tokens=MAX_TOKENS, request_id="req-1"
    )


METADATA = (("authorization", f"Bearer {KEY}"),)


async def _answer(
    router: Router, method: str, deadline_s: float | None = None
) -> pb.CompleteResponse:
    """The router's answer to ``_request`` (unmarked), by ``method``; streamed, its end."""
    if method == "Complete":
        answer: pb.CompleteResponse = await router.stub.Complete(
            _request(), metadata=METADATA, timeout=deadline_s
        )
        return answer
    async for chunk in router.stub.StreamComplete(
        _request(), metadata=METADATA, timeout=deadline_s
    ):
        if chunk.WhichOneof("part") == "end":
            end: pb.CompleteResponse = chunk.end
            return end
    raise AssertionError("the stream ended without its end")


async def _first_holds_the_id(routers: Routers) -> asyncio.Task[pb.CompleteResponse]:
    """The first router's call, its model call running (the id claimed in the ledger)."""
    one = asyncio.create_task(_answer(routers.first, "Complete"))
    await asyncio.wait_for(routers.first.pipeline.started.wait(), 5)
    assert await routers.redis.exists(ledger_key(TENANT, "req-1"))
    return one


async def _second_waits(
    routers: Routers, method: str, deadline_s: float | None = None
) -> asyncio.Task[pb.CompleteResponse]:
    """The unmarked repeat on the second router, waiting on the first call's claim."""
    two = asyncio.create_task(_answer(routers.second, method, deadline_s))
    await asyncio.wait_for(routers.second.ledger.waiting.wait(), 5)
    assert not two.done()
    return two


@pytest.mark.parametrize("method", METHODS)
async def test_a_repeat_cancelled_while_it_waits_gives_its_reservation_back(
    routers: Routers, method: str
) -> None:
    """It kept its 522 tokens (prompt + max_tokens) after its caller left, for a call that
    never reached a model; its place in the request rate stays taken, as an L1 hit's does."""
    one = await _first_holds_the_id(routers)
    before = await routers.level()  # the first call's reservation taken
    two = await _second_waits(routers, method)
    assert await routers.level() == before - RESERVED  # the repeat's, while it waits
    two.cancel()  # its caller leaves: the client cancels the RPC
    with pytest.raises(asyncio.CancelledError):
        await two
    assert await routers.second.servicer.handlers_ended(ENDED_S)
    assert await routers.level() == before  # given back whole
    assert (routers.second.pipeline.runs, routers.second.pipeline.replays) == (0, 0)
    routers.gate.set()
    assert (await one).content[0].text == "answer 1"
    assert await routers.level() == before + RESERVED - USED  # the first call's, settled


@pytest.mark.parametrize("method", METHODS)
async def test_a_repeat_whose_wait_ends_with_the_answer_is_its_replay_billed_once(
    routers: Routers, method: str
) -> None:
    one = await _first_holds_the_id(routers)
    before = await routers.level()
    two = await _second_waits(routers, method)
    routers.gate.set()
    first, again = await asyncio.gather(one, two)
    assert again.replayed and not first.replayed and again.content == first.content
    assert (routers.second.pipeline.runs, routers.second.pipeline.replays) == (0, 1)
    # the first call counts what it used; the replay gives its reservation back whole
    assert await routers.level() == before + RESERVED - USED


@pytest.mark.parametrize("method", METHODS)
async def test_a_repeat_that_takes_over_a_lapsed_claim_counts_its_reservation(
    routers: Routers, method: str
) -> None:
    """The first router died mid-call (its claim lapses): the repeat makes the model call, its
    reservation held while it runs and replaced by what it used, as any model call's."""
    one = await _first_holds_the_id(routers)
    second_gate = asyncio.Event()
    routers.second.pipeline.gate = second_gate
    before = await routers.level()
    two = await _second_waits(routers, method)
    await routers.redis.delete(ledger_key(TENANT, "req-1"))  # the lease lapsed
    await asyncio.wait_for(routers.second.pipeline.started.wait(), 5)
    assert await routers.level() == before - RESERVED  # held by its model call
    second_gate.set()
    answer = await two
    assert not answer.replayed and routers.second.pipeline.runs == 1
    assert await routers.level() == before - USED
    one.cancel()
    await asyncio.gather(one, return_exceptions=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ended_by", ["either", "grpc"])
async def test_a_repeat_whose_deadline_passes_while_it_waits_gives_its_reservation_back(
    routers: Routers, method: str, ended_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's gRPC deadline: whichever ends the wait first (gRPC cancelling the handler,
    or the wait's own check of the deadline: the latter, mostly, on an idle machine), no model
    call, nothing kept. ``grpc``: the wait is told of no deadline, so gRPC's cancel ends it, as
    it may on a loaded router."""
    if ended_by == "grpc":
        servicer = routers.second.servicer
        answered = servicer._answered

        def unbounded(*args: Any, **kwargs: Any) -> Any:
            tenant, request, call, retried, _ = args
            return answered(tenant, request, call, retried, None, **kwargs)

        monkeypatch.setattr(servicer, "_answered", unbounded)
    one = await _first_holds_the_id(routers)
    before = await routers.level()
    two = await _second_waits(routers, method, deadline_s=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await two
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await routers.second.servicer.handlers_ended(ENDED_S)
    assert await routers.level() == before
    routers.gate.set()
    await one


async def test_a_repeat_refused_at_its_own_deadline_gives_its_reservation_back(
    routers: Routers,
) -> None:
    """The wait's own check of the deadline, before gRPC cancelled the handler (called here
    directly, with a deadline gRPC does not enforce)."""

    class Deadlined(FakeContext):
        def time_remaining(self) -> float | None:
            return 0.3

    one = await _first_holds_the_id(routers)
    before = await routers.level()
    context = Deadlined()
    with pytest.raises(Aborted):
        await routers.second.servicer.Complete(_request(), context)  # type: ignore[arg-type]
    assert context.status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "still running on another router" in context.message
    assert await routers.level() == before
    routers.gate.set()
    await one


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dropped", [False, True], ids=["servicers-wait-for", "under-the-claim"])
async def test_a_cancel_that_lands_as_a_polls_reply_is_in_ends_the_call(
    routers: Routers, method: str, dropped: bool
) -> None:
    """The caller's cancel can land at any instant of the wait, also after a poll's reply came
    from Redis and before the call read it. The servicer's ``asyncio.wait_for`` (Python 3.11)
    then returned the reply and dropped the cancel; so may redis-py's own (``dropped``): the
    call went on waiting, for as long as the first call ran (here: until the test gave up).
    Cancels at random instants of the wait, each call's end waited for 2 s: 8 of 200 went on
    with a fake ledger that answers at once, 2 of 200 on a real Redis, and still 8 of 200
    there with only the servicer's own ``wait_for`` gone (redis-py's); now none."""
    one = await _first_holds_the_id(routers)
    before = await routers.level()
    two = await _second_waits(routers, method)
    task = routers.second.pipeline.task
    assert task is not None  # the handler's task: the one gRPC cancels when its caller leaves
    routers.second.ledger.drops_it = dropped
    routers.second.ledger.cancel_at_reply = task
    assert await routers.second.servicer.handlers_ended(ENDED_S), "the cancel was lost"
    assert await routers.level() == before
    two.cancel()
    await asyncio.gather(two, return_exceptions=True)
    routers.gate.set()
    await one
