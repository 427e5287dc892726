"""A hung semantic-cache (SIGSTOPped, a stuck loop, a host under swap) is left alone a while.

A dead L1 fails each Lookup at once; a hung one answers nothing until the Lookup's deadline
(``ROUTER_SEMANTIC_TIMEOUT_S``, 2 s, at most half of what the client's deadline leaves). Every
request paid that wait before its model call, for as long as L1 stayed hung. Now, after
``BREAKER_AFTER`` Lookups in a row timed out (each given at least half of
``ROUTER_SEMANTIC_TIMEOUT_S``: one cut short by its client's deadline proves little), no Lookup
is sent for ``ROUTER_SEMANTIC_BREAKER_S``: the model answers at once, the skip recorded as a
degradation; then one request tries L1 again.

Time is a fake clock the hung L1 moves by each call's deadline: nothing sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.env import ConfigError, Env
from services.common.errors import Code
from services.router.calls import DEGRADED_LOG_EVERY_MS, Calls
from services.router.dependencies import CallFailed, Dependencies
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
    _request,
)


@dataclass
class HungSemantic(FakeSemantic):
    """L1 that, while ``hung``, answers no call: each takes its whole deadline on ``clock``
    and fails DEADLINE_EXCEEDED, as a gRPC call to a stopped process does."""

    clock: FakeClock = field(default_factory=FakeClock)
    hung: bool = True
    deadlines: list[float] = field(default_factory=list)  # each Lookup's

    def _waits(self, deadline_s: float, *, moves: bool = True) -> None:
        """``moves`` False: a call that runs beside the request's (a lost Lookup's Release,
        in the background), whose wait is none of the request's."""
        if self.hung:
            self.clock.now += deadline_s if moves else 0.0
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        self.deadlines.append(deadline_s)
        self.lookups.append(request)
        self._waits(deadline_s)
        assert isinstance(self.reply, sc.LookupResponse)
        return self.reply

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        self.stores.append(request)
        self._waits(deadline_s)
        return sc.StoreResponse(stored=True, entry_id="e1")

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        self.releases.append(request)
        self._waits(deadline_s, moves=False)
        return sc.ReleaseResponse(released=True)

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        self.renewals.append(request)
        self._waits(deadline_s)
        return sc.RenewResponse(renewed=True, lease_s=30.0)


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


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    yield exported
    exported.clear()


@dataclass
class Rig:
    exporter: InMemorySpanExporter
    breaker_s: str = "5"
    clock: FakeClock = field(default_factory=FakeClock)
    semantic: HungSemantic = field(init=False)
    models: FakeModels = field(default_factory=FakeModels)
    counted: list[tuple[str, str]] = field(default_factory=list)  # the degraded metric

    def __post_init__(self) -> None:
        self.semantic = HungSemantic(clock=self.clock)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")
        settings = RouterSettings.from_env(_env(ROUTER_SEMANTIC_BREAKER_S=self.breaker_s), TABLE)
        deps = Dependencies(self.semantic, FakePrefix(), self.models, dict(REPLICAS))
        router = (load_router_model(), RouterCard.load().default_threshold, None)
        self.pipeline = Pipeline(
            deps, TABLE, TOKENIZER, self.tracer, settings, router, clock=self.clock
        )
        # the router's calls alone, with the degraded metric as a list
        self.calls = Calls(
            deps, settings, lambda what, why: self.counted.append((what, why)), self.tracer,
            self.clock, self._sleep,
        )  # fmt: skip

    async def _sleep(self, seconds: float) -> None:
        self.clock.now += seconds

    async def ask(self, deadline_s: float | None = 10.0) -> Asked:
        """One request: its answer, how long it took on the clock, and its degradations (its
        Store's, after the answer, on a span of their own under the request's)."""
        began, spans = self.clock.now, len(self.exporter.get_finished_spans())
        with self.tracer.start_as_current_span("request"):
            run = self.pipeline.run("tenant-a", _request(), time_remaining_s=deadline_s)
            end = [chunk async for chunk in run][-1].end
        took_s = self.clock.now - began
        await self.pipeline.drain()  # its Store, in the background
        degraded: list[dict[str, object]] = [
            dict(event.attributes or {})
            for span in self.exporter.get_finished_spans()[spans:]
            for event in span.events
            if event.name == "cachemesh.degraded"
        ]
        return Asked(end, took_s, degraded)


@dataclass
class Asked:
    end: pb.CompleteResponse
    took_s: float
    degraded: list[dict[str, object]]


def _breaker_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.levelno >= logging.INFO
        and ("ROUTER_SEMANTIC_BREAKER_S" in r.getMessage() or "answers again" in r.getMessage())
    ]


async def test_after_three_lookups_timed_out_in_a_row_l1_is_left_alone_for_a_while(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request paid a 2 s Lookup before its model call while L1 stayed hung; after three
    in a row the next requests send none for ROUTER_SEMANTIC_BREAKER_S (answered by the model
    at once, the skip a degradation on the span), then one tries L1 again: a timeout leaves it
    alone again at once, an answer ends the wait."""
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    rig = Rig(exporter)
    for _ in range(3):
        asked = await rig.ask()
        assert asked.end.served_by == pb.LAYER_MODEL and asked.took_s == pytest.approx(2.0)
        assert asked.degraded[0]["grpc.status"] == "DEADLINE_EXCEEDED"
        assert "cachemesh.skipped" not in asked.degraded[0]  # timed out
    assert len(rig.semantic.lookups) == 3
    asked = await rig.ask()
    assert asked.end.served_by == pb.LAYER_MODEL and asked.end.content[0].text == "Hello there."
    assert len(rig.semantic.lookups) == 3 and asked.took_s == 0  # no Lookup sent, no wait
    skipped = asked.degraded[0]
    assert skipped["dependency"] == "semantic-cache"
    assert skipped["grpc.status"] == "DEADLINE_EXCEEDED"  # counted as a timeout is
    assert "ROUTER_SEMANTIC_BREAKER_S" in str(skipped["cachemesh.skipped"])
    rig.clock.now += 5.0
    await rig.ask()  # one request tries L1 again: still hung
    assert len(rig.semantic.lookups) == 4
    await rig.ask()
    assert len(rig.semantic.lookups) == 4  # left alone again after that one timeout
    rig.clock.now += 5.0
    rig.semantic.hung = False  # back
    await rig.ask()
    await rig.ask()
    assert len(rig.semantic.lookups) == 6  # and asked by every request again
    lines = _breaker_lines(caplog)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "3 Lookups in a row timed out" in lines[0][1]


async def test_while_left_alone_stores_without_a_lease_are_skipped(
    exporter: InMemorySpanExporter,
) -> None:
    """Each request's Store would wait ROUTER_SEMANTIC_STORE_TIMEOUT_S (10 s) in the background
    on the hung L1 (and hold up the router's shutdown, which drains them): skipped, a lost
    future hit. The Store of a request that led (its Lookup took a lease before L1 hung) is
    sent: it ends that lease, on which identical requests wait."""
    rig = Rig(exporter)
    for _ in range(3):
        await rig.ask()
    stores = len(rig.semantic.stores)  # the Stores before L1 was left alone timed out
    asked = await rig.ask()
    assert len(rig.semantic.stores) == stores  # not sent
    lookup, store = asked.degraded
    assert lookup["cachemesh.skipped"] != store["cachemesh.skipped"]
    assert "no Lookup has answered since" in str(store["cachemesh.skipped"])
    answer = sc.CachedAnswer(content=[pb.ContentBlock(text="Hi.")], model="sim-large")
    assert await rig.calls.store("tenant-a", _request(), answer, lease_id="lease-1") is None
    assert len(rig.semantic.stores) == stores + 1  # a leader's: sent


async def test_releases_and_renewals_are_sent_while_l1_is_left_alone(
    exporter: InMemorySpanExporter,
) -> None:
    """Releases and renewals name leases taken before L1 hung (no Lookup takes one while it is
    left alone), few and off every answer's path: sent, so that once L1 answers again the
    requests waiting on such a lease are not held until its age limit."""
    rig = Rig(exporter)
    for _ in range(3):
        assert await rig.calls.lookup("tenant-a", _request()) is None
    lookups = len(rig.semantic.lookups)
    assert await rig.calls.lookup("tenant-a", _request()) is None
    assert len(rig.semantic.lookups) == lookups  # left alone
    # the degraded metric: 3 timeouts, then the skip, counted as one more
    assert rig.counted == [("semantic-cache", "DEADLINE_EXCEEDED")] * 4
    await rig.calls.release("tenant-a", _request(), "lease-1")
    assert [r.lease_id for r in rig.semantic.releases][-1] == "lease-1"
    led = sc.LookupResponse(leader=True, lease_id="lease-2", lease_s=30.0)
    await rig.calls.keep_lease("tenant-a", _request(), led)  # tries until it nearly lapses
    assert {r.lease_id for r in rig.semantic.renewals} == {"lease-2"}
    assert len(rig.semantic.lookups) == lookups  # still left alone: a renewal is no probe


async def test_timeouts_cut_short_by_the_clients_deadline_do_not_leave_l1_alone(
    exporter: InMemorySpanExporter,
) -> None:
    """A 1 s client deadline gives the Lookup 0.45 s, under half of ROUTER_SEMANTIC_TIMEOUT_S:
    its timeout is the client's hurry, not proof that L1 is hung."""
    rig = Rig(exporter)
    for _ in range(5):
        await rig.ask(1.0)
    assert len(rig.semantic.lookups) == 5
    assert rig.semantic.deadlines[0] == pytest.approx(0.45)


async def test_a_breaker_of_zero_seconds_never_leaves_l1_alone(
    exporter: InMemorySpanExporter,
) -> None:
    rig = Rig(exporter, breaker_s="0")
    for _ in range(5):
        await rig.ask()
    assert len(rig.semantic.lookups) == 5


def test_the_breaker_is_read_at_start_and_zero_turns_it_off() -> None:
    assert RouterSettings.from_env(_env(), TABLE).semantic_breaker_s == 5.0
    zero = RouterSettings.from_env(_env(ROUTER_SEMANTIC_BREAKER_S="0"), TABLE)
    assert zero.semantic_breaker_s == 0
    for bad in ("-1", "soon"):
        with pytest.raises(ConfigError, match="ROUTER_SEMANTIC_BREAKER_S"):
            RouterSettings.from_env(_env(ROUTER_SEMANTIC_BREAKER_S=bad), TABLE)


async def test_a_released_lost_lookups_lease_is_logged_at_most_once_an_interval(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Callers whose deadlines end before their Lookup's reply arrives each had an INFO line
    of their released lease (6 in 600 requests with short deadlines): one line an interval,
    saying how many it stands for, as the router's other degradations are logged."""
    caplog.set_level(logging.INFO, logger="cachemesh")
    rig = Rig(exporter)
    rig.semantic.hung = False
    release = sc.ReleaseRequest(tenant="tenant-a", lease_id="l1")
    for i in range(5):
        await rig.calls._release_unseen(release, f"r{i}")
    rig.clock.now += DEGRADED_LOG_EVERY_MS / 1000
    await rig.calls._release_unseen(release, "r5")
    lines = [r.getMessage() for r in caplog.records if "lease is released" in r.getMessage()]
    assert len(lines) == 2 and len(rig.semantic.releases) == 6, lines
    assert "r0" in lines[0] and "4 more since the last such line" in lines[1]
