"""A hung prefix-cache (SIGSTOPped, or its Redis stopped) degrades a request as a dead one does.

A dead prefix-cache fails each call at once; a hung one answers nothing until the call's
deadline. Plan, WARM and FINAL each waited ROUTER_PREFIX_TIMEOUT_S (2 s) in turn, whatever
the client's deadline left: with a 3 s deadline the model answered and the request still ended
DEADLINE_EXCEEDED, billed as a call without its answer. Now each call waits at most half of
what the request's deadline leaves (as the L1 Lookup does), and once one has timed out the
request makes no other: it goes on as with prefix-cache down (no Plan; WARM and FINAL to the
billing outbox). After a few timeouts in a row the router leaves prefix-cache alone for
ROUTER_PREFIX_BREAKER_S, so requests stop paying a timeout each while it stays hung.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.errors import Code
from services.router.dependencies import CallFailed, Dependencies
from services.router.outbox import BillingOutbox
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from services.router.settings import RouterSettings
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeSemantic,
    FakeStream,
    Rig,
    _answer,
    _request,
    _settings,
)

ARRIVED_MS = 1_700_000_000_000  # the Plan's arrival on prefix-cache's clock


@dataclass
class HungPrefix:
    """prefix-cache answering its first ``answers`` calls, then nothing: each later call takes
    its whole deadline on ``clock`` and fails DEADLINE_EXCEEDED, as a gRPC call to a stopped
    process does. ``calls``: each call's method and deadline."""

    clock: FakeClock
    answers: int = 0
    calls: list[tuple[str, float]] = field(default_factory=list)
    inner: FakePrefix = field(default_factory=FakePrefix)

    def _hung(self, method: str, deadline_s: float) -> bool:
        self.calls.append((method, deadline_s))
        if len(self.calls) <= self.answers:
            return False
        self.clock.now += deadline_s
        return True

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        if self._hung("Plan", deadline_s):
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
        plan = await self.inner.plan(request, deadline_s)
        plan.planned_at_ms = ARRIVED_MS
        return plan

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if self._hung(pc.CommitPhase.Name(request.phase), deadline_s):
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return await self.inner.commit(request, deadline_s)


def _rig(answers: int = 0) -> tuple[Rig, HungPrefix, FakePrefix, BillingOutbox]:
    clock = FakeClock()
    prefix = HungPrefix(clock, answers)
    back = FakePrefix()  # prefix-cache once it is back: the outbox's replays go there
    outbox = BillingOutbox(back, None, 1.0, 0.01)
    rig = Rig(prefix=prefix, clock=clock, outbox=outbox)  # type: ignore[arg-type]
    return rig, prefix, back, outbox


@pytest.mark.parametrize("deadline_s", [3.0, None])
async def test_a_hung_prefix_cache_leaves_the_request_answered_in_time_and_billed_later(
    deadline_s: float | None,
) -> None:
    """The Plan times out within half the deadline; WARM and FINAL are not sent to the hung
    process (each would have waited 2 s more): the answer goes out estimated within the
    client's deadline, its bill in the outbox, billed once prefix-cache is back. With no
    client deadline the Plan waits ROUTER_PREFIX_TIMEOUT_S, and is still the only wait."""
    rig, prefix, back, outbox = _rig()
    began = rig.clock.now
    end = (await rig.run(_request(), time_remaining_s=deadline_s))[-1].end
    assert end.content[0].text == "Hello there." and end.cost.estimated
    plan_s = 2.0 if deadline_s is None else (deadline_s - 0.1) / 2  # half of it less the margin
    assert [method for method, _ in prefix.calls] == ["Plan"]  # no WARM, no FINAL waited for
    assert prefix.calls[0][1] == pytest.approx(plan_s)
    if deadline_s is not None:
        assert rig.clock.now - began <= deadline_s - 0.1  # answered before the client gave up
        assert rig.models.deadlines == [pytest.approx(deadline_s - 0.1 - plan_s)]
    assert outbox.pending == 1
    assert await outbox.flush() == 1
    warm, final = back.commits
    assert warm.phase == pc.COMMIT_PHASE_WARM and warm.HasField("request")
    # no Plan: no bound on the read, judged at the router's time of the model call (the
    # provider's lookup), not reading what was written after it
    assert not warm.HasField("max_read_tokens") and not warm.HasField("planned_at_ms")
    assert warm.arrived_at_ms == rig.wall.now_ms()
    assert final.phase == pc.COMMIT_PHASE_FINAL and final.output_tokens == 3


async def test_a_warm_that_timed_out_sends_the_final_to_the_outbox_with_the_arrival() -> None:
    """prefix-cache hangs after the Plan: the WARM waits half of what is left, the FINAL is
    not sent; the outbox's WARM carries the Plan's read and arrival, so the replay bills the
    prompt as it was when the request arrived."""
    rig, prefix, back, outbox = _rig(answers=1)
    began = rig.clock.now
    end = (await rig.run(_request(), time_remaining_s=3.0))[-1].end
    assert end.cost.estimated
    assert [method for method, _ in prefix.calls] == ["Plan", "COMMIT_PHASE_WARM"]
    assert prefix.calls[1][1] == pytest.approx(2.9 / 2)
    assert rig.clock.now - began <= 2.9
    assert await outbox.flush() == 1
    warm, final = back.commits
    assert (warm.max_read_tokens, warm.planned_at_ms) == (0, ARRIVED_MS)
    assert final.phase == pc.COMMIT_PHASE_FINAL


class PlanFails(FakePrefix):
    """prefix-cache refusing the Plan (overloaded in a burst) but taking the commits."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        self.plans.append(request)
        raise CallFailed(Code.UNAVAILABLE, "overloaded")


async def test_without_a_plan_the_warm_carries_the_arrival_of_the_model_call() -> None:
    """Requests sharing a prefix arrive together and their Plans fail: each WARM carried the
    request alone and was judged at its first token, so the later one read the earlier one's
    fresh write (0.1x), where the provider, looked up before that write existed, bills a write
    too. The router's time of the model call goes with it: prefix-cache judges it then."""
    rig = Rig(prefix=PlanFails(), wall=ManualClock(1_800_000_000_000))
    end = (await rig.run(_request()))[-1].end
    assert end.content[0].text == "Hello there."
    warm = next(c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_WARM)
    assert warm.HasField("request") and not warm.plan_id
    assert not warm.HasField("max_read_tokens") and not warm.HasField("planned_at_ms")
    assert warm.arrived_at_ms == 1_800_000_000_000


def _old_commit_request() -> type[Message]:
    """``CommitRequest`` as a prefix-cache older than ``arrived_at_ms`` (field 15) parses it."""
    file = descriptor_pb2.FileDescriptorProto()
    pc.DESCRIPTOR.CopyToProto(file)
    commit = next(m for m in file.message_type if m.name == "CommitRequest")
    kept = [f for f in commit.field if f.name != "arrived_at_ms"]
    assert len(kept) == len(commit.field) - 1
    del commit.field[:]
    commit.field.extend(kept)
    assert commit.oneof_decl[-1].name == "_arrived_at_ms"  # proto3 optional's, the last
    del commit.oneof_decl[-1]
    pool = descriptor_pool.DescriptorPool()
    for dependency in pc.DESCRIPTOR.dependencies:
        dependency_file = descriptor_pb2.FileDescriptorProto()
        dependency.CopyToProto(dependency_file)
        pool.Add(dependency_file)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("cachemesh.v1.CommitRequest"))


async def test_an_older_prefix_cache_takes_the_warm_made_without_a_plan() -> None:
    """In a rolling upgrade the new router's WARM without a Plan reaches an older
    prefix-cache, which refuses planned_at_ms without max_read_tokens (INVALID_ARGUMENT: the
    live WARM refused, its outbox replay dropped, a bill lost). The arrival is in a field that
    one does not know: it parses the WARM as the request alone, which it bills at the first
    token as before."""
    rig = Rig(prefix=PlanFails(), wall=ManualClock(1_800_000_000_000))
    await rig.run(_request())
    warm = next(c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_WARM)
    old = _old_commit_request().FromString(warm.SerializeToString())
    assert old.phase == pc.COMMIT_PHASE_WARM and old.HasField("request")  # type: ignore[attr-defined]
    assert old.request.SerializeToString() == warm.request.SerializeToString()  # type: ignore[attr-defined]
    # what the older prefix-cache checks: no planned_at_ms without max_read_tokens
    assert not old.HasField("max_read_tokens") and not old.HasField("planned_at_ms")


def _env(**extra: str) -> Env:
    return Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
            "CACHEMESH_API_KEYS_FILE": "/nonexistent",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "ROUTER_SEMANTIC_LEASE_WAIT_S": "0",
            **extra,
        }
    )


def _pipeline(rig: Rig, breaker_s: str) -> Pipeline:
    settings = RouterSettings.from_env(_env(ROUTER_PREFIX_BREAKER_S=breaker_s), TABLE)
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), settings, router,
        outbox=rig.outbox, clock=rig.clock,
    )  # fmt: skip


async def _ask(pipeline: Pipeline, deadline_s: float = 3.0) -> pb.CompleteResponse:
    run = pipeline.run("tenant-a", _request(), time_remaining_s=deadline_s)
    return [chunk async for chunk in run][-1].end


async def test_after_three_timeouts_in_a_row_prefix_cache_is_left_alone_for_a_while() -> None:
    """Each request still paid one Plan timeout while prefix-cache stayed hung; after three in
    a row the next requests make no call for ROUTER_PREFIX_BREAKER_S, then one call tries it
    again (a timeout leaves it alone again at once, an answer ends the wait)."""
    rig, prefix, _, outbox = _rig()
    pipeline = _pipeline(rig, "5")
    for _ in range(3):
        assert (await _ask(pipeline)).cost.estimated
    assert len(prefix.calls) == 3
    began = rig.clock.now
    assert (await _ask(pipeline)).cost.estimated
    assert len(prefix.calls) == 3 and rig.clock.now == began  # not asked, no time spent
    rig.clock.now += 5.0
    await _ask(pipeline)  # tried again: still hung
    assert len(prefix.calls) == 4
    await _ask(pipeline)
    assert len(prefix.calls) == 4  # left alone again after one timeout
    rig.clock.now += 5.0
    prefix.answers = 10**6  # back
    assert not (await _ask(pipeline)).cost.estimated
    assert not (await _ask(pipeline)).cost.estimated  # and it is asked again
    assert outbox.pending == 6  # every answer served while it was hung keeps its bill


class SlowStream(FakeStream):
    """An answer whose text takes ``takes_s`` on ``clock``."""

    def __init__(self, replica: str, clock: FakeClock, takes_s: float) -> None:
        super().__init__(_answer(replica))
        self._clock, self._takes_s = clock, takes_s

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = await super().read()
        if chunk is not None and chunk.WhichOneof("part") == "text":
            self._clock.now += self._takes_s
        return chunk


async def test_a_request_that_skipped_prefix_cache_skips_it_to_its_end() -> None:
    """The Plan not made (prefix-cache left alone), and the wait over while the model answers:
    the WARM and FINAL are not sent either (a FINAL without its WARM is refused, and the WARM
    alone would read a prefix the Plan never capped); both go to the outbox."""
    rig, prefix, _, outbox = _rig()
    pipeline = _pipeline(rig, "5")
    for _ in range(3):
        await _ask(pipeline)
    rig.models.generate = lambda replica, request, deadline_s: SlowStream(  # type: ignore[method-assign]
        replica, rig.clock, 6.0
    )
    cost = (await _ask(pipeline, 60.0)).cost
    assert cost.estimated and len(prefix.calls) == 3  # nothing sent once the wait was over
    assert outbox.pending == 4


@dataclass
class HungPlans(HungPrefix):
    """As ``HungPrefix`` for its Plans; its commits are answered."""

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.calls.append((pc.CommitPhase.Name(request.phase), deadline_s))
        return await self.inner.commit(request, deadline_s)


async def test_timeouts_cut_short_by_the_clients_deadline_do_not_leave_it_alone() -> None:
    """A 0.5 s client deadline gives the Plan 0.225 s: its timeout is the client's hurry, not
    proof that prefix-cache is hung, and leaves the next requests' calls alone. (Each answer
    goes at once at the estimate, the request's prefix-cache calls off; its bill, a WARM again
    with the request and the FINAL, under the router's own ROUTER_PREFIX_TIMEOUT_S: timeouts
    there would be prefix-cache's, and count.)"""
    rig, _, _, outbox = _rig()
    prefix = HungPlans(rig.clock)
    rig.prefix = prefix  # type: ignore[assignment]
    pipeline = _pipeline(rig, "5")
    for _ in range(5):
        assert (await _ask(pipeline, 0.5)).cost.estimated
    await pipeline.drain()
    plans = [deadline_s for method, deadline_s in prefix.calls if method == "Plan"]
    assert len(plans) == 5
    assert plans[0] == pytest.approx(0.225)  # (0.5 s less its 0.05 s margin) / 2
    assert outbox.pending == 0  # billed by prefix-cache, after the answers


async def test_a_breaker_of_zero_seconds_never_leaves_prefix_cache_alone() -> None:
    rig, prefix, _, _ = _rig()
    pipeline = _pipeline(rig, "0")
    for _ in range(5):
        await _ask(pipeline)
    assert len(prefix.calls) == 5  # one Plan a request, none skipped across requests


def test_the_breaker_is_read_at_start_and_zero_turns_it_off() -> None:
    assert RouterSettings.from_env(_env(), TABLE).prefix_breaker_s == 5.0
    assert RouterSettings.from_env(_env(ROUTER_PREFIX_BREAKER_S="0"), TABLE).prefix_breaker_s == 0
    with pytest.raises(ConfigError, match="ROUTER_PREFIX_BREAKER_S"):
        RouterSettings.from_env(_env(ROUTER_PREFIX_BREAKER_S="-1"), TABLE)


class SlowForHuge(FakePrefix):
    """Answers at once, except the Plans of a prompt it takes longer than their deadline to
    count (a tenant's huge system prompt)."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        if "HUGE" in request.request.system[0].text:
            self.plans.append(request)
            await asyncio.sleep(0)  # every tier's Plan is in flight at once, as over gRPC
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return await super().plan(request, deadline_s)


def _auto(system: str, request_id: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="auto",
        request_id=request_id,
        max_tokens=50,
        system=[pb.ContentBlock(text=system)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Summarise it.")])],
    )


async def test_one_requests_plans_of_every_tier_count_once_toward_leaving_it_alone() -> None:
    """A cost-aware ``auto`` request plans every tier at once: its timeouts are one request's,
    and two such requests (one tenant's huge prompt) leave prefix-cache to the other tenants."""
    clock = FakeClock()
    prefix = SlowForHuge()
    settings = dataclasses.replace(_settings(), cost_aware=True)
    deps = Dependencies(FakeSemantic(), prefix, FakeModels(), dict(REPLICAS))
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), settings, router, clock=clock,
        outbox=BillingOutbox(FakePrefix(), None, 1.0, 0.01),
    )  # fmt: skip

    async def run(tenant: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
        return [c async for c in pipeline.run(tenant, request)][-1].end

    for i in range(2):
        before = len(prefix.plans)
        await run("tenant-a", _auto("HUGE policy document " * 50, f"a{i}"))
        assert len(prefix.plans) - before > 1  # every tier's Plan timed out
    before = len(prefix.plans)
    end = await run("tenant-b", _auto("You are a helpful support agent.", "b"))
    assert len(prefix.plans) > before and not end.cost.estimated
    await pipeline.drain()
