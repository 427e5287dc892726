"""The router's L1 lookup waits once more, longer, when an identical model call is in flight."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import pytest
from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.env import Env
from services.common.errors import Code, RequestError
from services.common.model_overrides import model_table_from_env
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from services.router.settings import RouterSettings
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeClock, FakeModels, FakePrefix
from tests.waits import reached

REPLICAS = "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1"


class ScriptedLookup:
    """Answers Lookup from a script, recording each call's deadline."""

    def __init__(
        self,
        *replies: sc.LookupResponse | Code,
        clock: FakeClock | None = None,
        takes_s: float = 0,
        slow: bool = False,
    ) -> None:
        """``slow``: each call takes its whole deadline (an L1 that answers nothing in time)."""
        self._replies = list(replies)
        self.timeouts: list[float] = []
        self.lookups: list[sc.LookupRequest] = []
        self.releases: list[sc.ReleaseRequest] = []
        self._clock = clock  # moved on by ``takes_s`` at each call
        self._takes_s = takes_s
        self._slow = slow

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        self.timeouts.append(deadline_s)
        self.lookups.append(sc.LookupRequest(lease_id=request.lease_id))
        if self._clock is not None:
            self._clock.now += deadline_s if self._slow else self._takes_s
        reply = self._replies.pop(0)
        if isinstance(reply, Code):
            raise CallFailed(reply, "late")
        return reply

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        return sc.StoreResponse(stored=True)

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        self.releases.append(request)
        return sc.ReleaseResponse(released=True)


def settings(lease_wait_s: str) -> RouterSettings:
    env = Env(
        {
            "MODEL_REPLICAS": REPLICAS,
            "CACHEMESH_API_KEYS_FILE": "/dev/null",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "ROUTER_SEMANTIC_TIMEOUT_S": "2",
            "ROUTER_SEMANTIC_LEASE_WAIT_S": lease_wait_s,
        }
    )
    return RouterSettings.from_env(env, model_table_from_env(env))


def calls(stub: ScriptedLookup, lease_wait_s: str, clock: FakeClock | None = None) -> Calls:
    dependencies = Dependencies(
        semantic=cast(Any, stub), prefix=cast(Any, None), model=cast(Any, None), models={}
    )
    return Calls(dependencies, settings(lease_wait_s), clock=clock or FakeClock())


HIT = sc.LookupResponse(hit=True, waited=True)
PENDING = sc.LookupResponse(pending=True)


async def test_a_pending_miss_looks_again_with_the_lease_wait_as_deadline() -> None:
    stub = ScriptedLookup(PENDING, HIT)
    reply = await calls(stub, "30").lookup("tenant-a", pb.CompleteRequest())
    assert reply is not None and reply.hit and reply.waited
    assert stub.timeouts == [2.0, 30.0]


@pytest.mark.parametrize("first", [sc.LookupResponse(), sc.LookupResponse(leader=True), HIT])
async def test_a_miss_without_a_lease_in_flight_or_a_hit_is_looked_up_once(
    first: sc.LookupResponse,
) -> None:
    stub = ScriptedLookup(first)
    assert await calls(stub, "30").lookup("tenant-a", pb.CompleteRequest()) == first
    assert stub.timeouts == [2.0]


async def test_lease_wait_zero_never_waits_longer() -> None:
    stub = ScriptedLookup(PENDING)
    assert await calls(stub, "0").lookup("tenant-a", pb.CompleteRequest()) == PENDING
    assert stub.timeouts == [2.0]


async def test_a_second_lookup_that_fails_degrades_to_the_first_miss() -> None:
    stub = ScriptedLookup(PENDING, Code.DEADLINE_EXCEEDED)
    assert await calls(stub, "30").lookup("tenant-a", pb.CompleteRequest()) == PENDING
    assert stub.timeouts == [2.0, 30.0]


@pytest.mark.parametrize(
    ("lease_wait_s", "deadline", "second"),
    [
        ("30", 1_011.0, 5.0),  # 10 s left after the first lookup: half of it
        ("3", 1_011.0, 3.0),  # the setting when it is sooner
        ("30", None, 30.0),  # no client deadline: the setting
    ],
)
async def test_the_second_lookup_waits_at_most_half_of_what_the_deadline_leaves(
    lease_wait_s: str, deadline: float | None, second: float
) -> None:
    clock = FakeClock(now=1_000.0)
    stub = ScriptedLookup(PENDING, HIT, clock=clock, takes_s=1.0)  # the first lookup: 1 s
    reply = await calls(stub, lease_wait_s, clock).lookup(
        "tenant-a", pb.CompleteRequest(), deadline=deadline
    )
    assert reply is not None and reply.hit
    assert stub.timeouts == [2.0, second]


async def test_no_second_lookup_once_the_deadline_has_passed() -> None:
    clock = FakeClock(now=1_000.0)
    stub = ScriptedLookup(PENDING, clock=clock, takes_s=2.0)  # the deadline passes meanwhile
    reply = await calls(stub, "30", clock).lookup(
        "tenant-a", pb.CompleteRequest(), deadline=1_001.5
    )
    assert reply == PENDING  # the request calls the model itself
    assert stub.timeouts == [0.75]  # half of the 1.5 s left, not the 2 s setting


def pipeline_on(stub: ScriptedLookup, clock: FakeClock, models: FakeModels) -> Pipeline:
    dependencies = Dependencies(
        semantic=cast(Any, stub),
        prefix=cast(Any, FakePrefix()),
        model=cast(Any, models),
        models={"sim-large": ("large-1",)},
    )
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(
        dependencies, TABLE, TOKENIZER, trace.NoOpTracer(), settings("30"), router, clock=clock
    )


async def test_a_request_waits_on_its_twin_within_its_own_deadline_then_calls_the_model() -> None:
    """A 3 s client deadline, an identical request's model call still on (its router may have
    died): the wait takes half of what the deadline leaves, then the model answers this one."""
    clock = FakeClock(now=1_000.0)
    stub = ScriptedLookup(PENDING, PENDING)
    models = FakeModels()
    pipeline = pipeline_on(stub, clock, models)
    request = build_request("How do I reset my password?", model="sim-large", request_id="r1")
    chunks = [c async for c in pipeline.run("tenant-a", request, time_remaining_s=3.0)]
    await pipeline.drain()
    assert chunks[-1].end.served_by == pb.LAYER_MODEL and len(models.calls) == 1
    # the model calls' deadline is 3 s less the 100 ms reply margin: each Lookup takes at
    # most half of what it leaves (these answer at once, so both may take 1.45 s)
    assert stub.timeouts == [pytest.approx(1.45), pytest.approx(1.45)]


async def test_a_slow_l1_leaves_a_short_client_deadline_its_model_call() -> None:
    """A 500 ms client deadline and an L1 that answers nothing in time: the Lookup gives up
    within half of what the deadline leaves, and the model answers (before, the Lookup took
    its whole 2 s and the request failed DEADLINE_EXCEEDED without any model call)."""
    clock = FakeClock(now=1_000.0)
    stub = ScriptedLookup(Code.DEADLINE_EXCEEDED, clock=clock, slow=True)
    models = FakeModels()
    pipeline = pipeline_on(stub, clock, models)
    request = build_request("How do I reset my password?", model="sim-large", request_id="r2")
    chunks = [c async for c in pipeline.run("tenant-a", request, time_remaining_s=0.5)]
    await pipeline.drain()
    assert chunks[-1].end.served_by == pb.LAYER_MODEL and len(models.calls) == 1
    # 0.5 s less the reply margin (a tenth of a deadline that short): 0.45 s, half of it
    assert stub.timeouts == [pytest.approx(0.225)]
    assert models.deadlines == [pytest.approx(0.225)]  # the other half: the model call's


async def test_a_very_short_deadline_keeps_50_ms_to_tell_its_caller() -> None:
    """A 200 ms client deadline: the model call and the Lookup end 50 ms before it, not a
    tenth of it (20 ms), so the router's own cut (billed) reaches the caller before gRPC's
    deadline does (with 20 ms, 5 of 64 such cuts on a loaded machine came after it, and the
    client could not tell a billed cut from a call never received)."""
    clock = FakeClock(now=1_000.0)
    stub = ScriptedLookup(Code.DEADLINE_EXCEEDED, clock=clock, slow=True)
    models = FakeModels()
    pipeline = pipeline_on(stub, clock, models)
    request = build_request("How do I reset my password?", model="sim-large", request_id="r3")
    chunks = [c async for c in pipeline.run("tenant-a", request, time_remaining_s=0.2)]
    await pipeline.drain()
    assert chunks[-1].end.served_by == pb.LAYER_MODEL
    assert stub.timeouts == [pytest.approx(0.075)]  # (0.2 - 0.05) / 2
    assert models.deadlines == [pytest.approx(0.075)]


async def settled() -> None:
    """Lets the Releases sent in the background run (they await nothing but the fake)."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("replies", "released"),
    [
        ((PENDING, HIT), []),  # each reply arrived: nothing to release
        ((Code.DEADLINE_EXCEEDED,), [0]),  # the reply may have been sent, and come too late
        ((Code.UNAVAILABLE,), [0]),  # the connection broke on the way
        ((PENDING, Code.CANCELLED), [1]),  # the second Lookup's own lease, not the first's
        ((Code.INVALID_ARGUMENT,), []),  # refused: no lease was taken
    ],
)
async def test_a_lookup_names_a_fresh_lease_and_one_whose_reply_is_lost_releases_it(
    replies: tuple[sc.LookupResponse | Code, ...], released: list[int]
) -> None:
    """A leading Lookup whose reply was lost left L1 holding a lease the router never knew it
    held (nor renewed, nor released): identical requests waited on it up to its age limit."""
    stub = ScriptedLookup(*replies)
    request = build_request("Reset my password", request_id="r7")
    with contextlib.suppress(RequestError):
        await calls(stub, "30").lookup("tenant-a", request)
    await settled()
    ids = [lookup.lease_id for lookup in stub.lookups]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)  # fresh, each
    assert [r.lease_id for r in stub.releases] == [ids[n] for n in released]
    # by its id alone, as a renewal: not the request again (it may be a megabyte)
    assert all(r.tenant == "tenant-a" and not r.HasField("request") for r in stub.releases)
    # with its request_id: L1 ends only a lease this request took, not one another request
    # took under the same id once this one's had ended
    assert all(r.request_id == "r7" for r in stub.releases)


async def test_a_lookup_cancelled_with_its_request_releases_its_lease() -> None:
    """The client went away during the Lookup: L1 may have taken the lease all the same."""
    blocked = asyncio.Event()

    class Hanging(ScriptedLookup):
        async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
            self.lookups.append(sc.LookupRequest(lease_id=request.lease_id))
            blocked.set()
            await asyncio.Event().wait()  # until cancelled
            raise AssertionError("unreachable")

    stub = Hanging()
    looking = asyncio.ensure_future(
        calls(stub, "30").lookup("tenant-a", build_request("Reset my password"))
    )
    await reached(blocked, "blocked")
    looking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await looking
    await settled()
    assert [r.lease_id for r in stub.releases] == [stub.lookups[0].lease_id]


@pytest.mark.parametrize("mode", [pb.SEMANTIC_MODE_REFRESH, pb.SEMANTIC_MODE_NO_STORE])
async def test_a_lookup_that_never_leads_releases_nothing(mode: pb.SemanticMode.ValueType) -> None:
    request = build_request("Reset my password")
    request.cache.semantic = mode
    stub = ScriptedLookup(Code.DEADLINE_EXCEEDED)
    assert await calls(stub, "30").lookup("tenant-a", request) is None
    await settled()
    assert not stub.releases
