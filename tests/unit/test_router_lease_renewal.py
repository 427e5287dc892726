"""A leading Lookup's lease is renewed while the request's model call runs (fakes of the
router's ports; the renewals' waits are an injected ``sleep``, nothing is timed).

The lease's age limit (SEMANTIC_CACHE_LEASE_S) is fixed from its take or its last renewal: a
model call longer than that, renewed by nobody, lost its lease mid-call, and an identical
request then led a second paid call of its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import Code
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeModels,
    FakePrefix,
    FakeSemantic,
    FakeStream,
    _answer,
    _request,
    _settings,
)

LEADER = sc.LookupResponse(leader=True, lease_id="lease-1", lease_s=30.0)
# Only against a hang: with no renewals the held answers below never end (nothing is timed).
GUARD_S = 30.0


@dataclass
class Renewing(FakeSemantic):
    """Answers each Renew with the next of ``answers`` (then: renewed, 30 s)."""

    answers: list[sc.RenewResponse | CallFailed] = field(default_factory=list)
    deadlines: list[float] = field(default_factory=list)
    renewed: asyncio.Event = field(default_factory=asyncio.Event)  # set at each renewal
    wanted: int = 3  # renewals after which ``renewed`` is set

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        self.renewals.append(request)
        self.deadlines.append(deadline_s)
        if len(self.renewals) >= self.wanted:
            self.renewed.set()
        answer = self.answers.pop(0) if self.answers else sc.RenewResponse(renewed=True)
        if isinstance(answer, CallFailed):
            raise answer
        return answer


@dataclass
class Waits:
    """The renewals' ``sleep``: each wait recorded, and passed on the calls' clock."""

    now: float = 1_000.0
    waits: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def calls_on(semantic: FakeSemantic, waits: Waits, degraded: list[tuple[str, str]]) -> Calls:
    deps = Dependencies(semantic, FakePrefix(), FakeModels(), REPLICAS)
    counted = lambda what, why: degraded.append((what, why))  # noqa: E731
    return Calls(deps, _settings(), counted, clock=waits.clock, sleep=waits.sleep)


async def test_a_lease_is_renewed_every_third_of_its_life_until_it_is_found_over() -> None:
    """L1 down for one renewal: counted as a degradation and tried again soon (the request goes
    on); L1's new age limit sets the next interval; a lease found ended stops the renewals (no
    error: the request still goes on to its model call)."""
    semantic = Renewing(
        answers=[
            sc.RenewResponse(renewed=True, lease_s=30.0),
            CallFailed(Code.UNAVAILABLE, "semantic-cache restarting"),
            sc.RenewResponse(renewed=True, lease_s=3.0),
            sc.RenewResponse(renewed=False),
        ]
    )
    waits, degraded = Waits(), list[tuple[str, str]]()
    await calls_on(semantic, waits, degraded).keep_lease("tenant-a", _request(), LEADER)
    # a third of 30 s; again; 5 % of it after the failure; a third of L1's new 3 s
    assert waits.waits == [10.0, 10.0, 1.5, 1.0]
    # ROUTER_SEMANTIC_TIMEOUT_S (2 s), and never longer than the wait before it
    assert semantic.deadlines == [2.0, 2.0, 1.5, 1.0]
    assert [(r.tenant, r.lease_id) for r in semantic.renewals] == [("tenant-a", "lease-1")] * 4
    assert degraded == [("semantic-cache", "UNAVAILABLE")]


async def test_a_renewal_names_its_lease_and_not_its_prompt() -> None:
    """A renewal is sent every third of the lease for as long as the call runs: it carried
    the whole request (1 MiB for an agent's turn, 29 MiB over a 300 s call, each one
    re-serialised, hashed and derived again on L1's event loop). Its lease_id names it."""
    sizes = []
    for prompt in ("How do I reset my password?", "x" * (1 << 20)):
        semantic = Renewing(answers=[sc.RenewResponse(renewed=False)])
        request = build_request(prompt, model="sim-large", request_id="r1")
        await calls_on(semantic, Waits(), []).keep_lease("tenant-a", request, LEADER)
        [renewal] = semantic.renewals
        # and its request_id: L1 renews only a lease this request took (a late renewal
        # renewed a lease another request took under the same id once this one's ended)
        assert (renewal.tenant, renewal.lease_id, renewal.request_id) == (
            "tenant-a",
            "lease-1",
            "r1",
        )
        sizes.append(renewal.ByteSize())
    assert sizes[0] == sizes[1] < 64


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_renewals_that_fail_back_off_and_stop_before_the_lease_lapses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """L1 unreachable (or too slow) for good: retried every 1.5 s until the lease lapsed,
    every in-flight leader renewed ~6.7x as often as normally (more load on an L1 that may
    only be overloaded) and logged a WARNING each time (15 a lease). Now the retry waits
    double from 5 % of the lease up to the normal third, the last one no later than 5 % before
    the lease lapses (one then would only be refused); each failure counted, two lines."""
    down = CallFailed(Code.UNAVAILABLE, "semantic-cache is down")
    semantic = Renewing(answers=[down] * 100)
    waits, degraded = Waits(), list[tuple[str, str]]()
    caplog.set_level(logging.INFO, logger="cachemesh.router")
    await calls_on(semantic, waits, degraded).keep_lease("tenant-a", _request(), LEADER)
    # tries at 10, 11.5, 14.5, 20.5 and 28.5 s: the lease lapses at 30 s
    assert waits.waits == [10.0, 1.5, 3.0, 6.0, 8.0]
    assert semantic.deadlines == [2.0, 1.5, 2.0, 2.0, 2.0]
    assert len(semantic.renewals) == len(degraded) == 5  # each failure counted
    lines = warnings(caplog)
    assert len(lines) == 2, lines  # its first failure, and the give-up
    assert "tenant-a" in lines[0] and "r1" in lines[0] and "UNAVAILABLE" in lines[0]
    assert "not renewed any more" in lines[1]


@dataclass
class Slow(Renewing):
    """Each Renew takes its whole deadline on ``waits``' clock (then: what ``answers`` says)."""

    waits: Waits = field(default_factory=Waits)

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        self.waits.now += deadline_s
        return await super().renew(request, deadline_s)


async def test_a_slow_l1_is_tried_less_and_less_often_and_never_past_the_lease() -> None:
    """Each try times out (L1 overloaded, not down): the backoff counts from each try's end,
    and the last try still starts 1.5 s before the lease lapses."""
    waits, degraded = Waits(), list[tuple[str, str]]()
    semantic = Slow(answers=[CallFailed(Code.DEADLINE_EXCEEDED, "slow")] * 100, waits=waits)
    started = waits.now
    await calls_on(semantic, waits, degraded).keep_lease("tenant-a", _request(), LEADER)
    # tries at 10 (to 12), 13.5 (to 15), 18 (to 20), 26 (to 28) and 28.5 s (to 29)
    assert waits.waits == [10.0, 1.5, 3.0, 6.0, 0.5]
    assert semantic.deadlines == [2.0, 1.5, 2.0, 2.0, 0.5]
    assert waits.now - started == 29.0 and len(degraded) == 5


async def test_a_renewal_that_succeeds_again_restarts_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An L1 back from a blip: renewed every third again, and a later failure of the same
    lease is retried after 5 % again (counted, not logged once more)."""
    down = CallFailed(Code.UNAVAILABLE, "semantic-cache restarting")
    semantic = Renewing(
        answers=[
            down,
            down,
            sc.RenewResponse(renewed=True, lease_s=30.0),
            down,
            sc.RenewResponse(renewed=False),
        ]
    )
    waits, degraded = Waits(), list[tuple[str, str]]()
    caplog.set_level(logging.INFO, logger="cachemesh.router")
    await calls_on(semantic, waits, degraded).keep_lease("tenant-a", _request(), LEADER)
    assert waits.waits == [10.0, 1.5, 3.0, 10.0, 1.5]
    assert len(degraded) == 3 and len(warnings(caplog)) == 1


async def test_no_lease_no_renewal() -> None:
    """Not a leader, or an L1 that does not tell the lease's life (older): nothing to renew."""
    semantic = Renewing()
    waits = Waits()
    calls = calls_on(semantic, waits, [])
    await calls.keep_lease("tenant-a", _request(), sc.LookupResponse(pending=True))
    await calls.keep_lease("tenant-a", _request(), sc.LookupResponse(leader=True, lease_id="l"))
    assert not waits.waits and not semantic.renewals


class HeldStream(FakeStream):
    """The model's answer, whose end comes only once ``until`` is set (a long decode)."""

    def __init__(self, chunks: list[model_pb2.GenerateChunk | CallFailed], until: asyncio.Event):
        super().__init__(chunks)
        self._until = until
        self._read = 0

    async def read(self) -> model_pb2.GenerateChunk | None:
        self._read += 1
        if self._read == 3:  # start, text, then the end
            await self._until.wait()
        return await super().read()


@dataclass
class SlowModels(FakeModels):
    until: asyncio.Event = field(default_factory=asyncio.Event)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        return HeldStream(_answer(replica), self.until)


def pipeline(semantic: FakeSemantic, models: FakeModels) -> Pipeline:
    async def at_once(_: float) -> None:
        await asyncio.sleep(0)  # a lease's third, passed: the next renewal is due

    return Pipeline(
        Dependencies(semantic, FakePrefix(), models, REPLICAS),
        TABLE,
        TOKENIZER,
        trace.NoOpTracer(),
        _settings(),
        (load_router_model(), RouterCard.load().default_threshold, None),
        sleep=at_once,
    )


async def settle() -> None:
    for _ in range(20):  # what a renewal left running would do meanwhile
        await asyncio.sleep(0)


async def test_the_leader_renews_its_lease_while_its_model_call_runs_until_its_store() -> None:
    semantic = Renewing(reply=LEADER)
    models = SlowModels(until=semantic.renewed)  # the answer ends after three renewals
    answering = pipeline(semantic, models)
    async with asyncio.timeout(GUARD_S):
        chunks = [c async for c in answering.run("tenant-a", _request())]
    assert chunks[-1].end.served_by == pb.LAYER_MODEL
    await answering.drain()
    renewed = len(semantic.renewals)
    assert renewed >= 3 and {r.lease_id for r in semantic.renewals} == {"lease-1"}
    await settle()
    assert len(semantic.renewals) == renewed  # the Store ended the lease: no more renewals
    assert len(semantic.stores) == 1 and not semantic.releases


async def test_a_call_that_ends_without_its_answer_stops_renewing_and_releases() -> None:
    semantic = Renewing(reply=LEADER, wanted=2)
    models = SlowModels()  # never ends by itself
    answering = pipeline(semantic, models)
    run = answering.run("tenant-a", _request())
    assert (await anext(run)).WhichOneof("part") == "start"
    assert (await anext(run)).WhichOneof("part") == "delta"
    async with asyncio.timeout(GUARD_S):
        await semantic.renewed.wait()  # renewed twice while the caller reads
    await run.aclose()  # the caller left mid-answer
    await answering.drain()
    renewed = len(semantic.renewals)
    await settle()
    assert len(semantic.renewals) == renewed
    assert [r.lease_id for r in semantic.releases] == ["lease-1"] and not semantic.stores
