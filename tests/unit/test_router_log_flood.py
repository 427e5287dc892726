"""An outage of one dependency is a few log lines, not one a request.

While prefix-cache, semantic-cache or the limits' Redis was down, the router logged a WARNING
for every call that failed (at 100 requests a second, 100 lines a second, and one a half-open
trial with the breaker open: ~720 an hour). Now the first failure of a dependency (and
operation, and status code) is logged at once, then one line an interval at most, saying how
many were not logged; a trial that times out while its breaker is open logs at DEBUG (the
breaker's WARNING said why). Every failure is still counted in the degraded metric and on its
span, one each. Time is a fake clock: nothing sleeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code
from services.router.breaker import redis_breaker
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limit_tickets import Ticket
from services.router.limits import Limiter
from services.router.settings import RouterSettings
from tests.unit.test_router_limits import _answer, _Broken, _count, _request
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeSemantic,
)
from tests.unit.test_router_semantic_hang import _env

REQUESTS = 300  # 100 requests a second for 3 s
EVERY_S = 0.01


@dataclass
class DownPrefix(FakePrefix):
    """prefix-cache failing every call with ``code``."""

    code: Code = Code.UNAVAILABLE

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        raise CallFailed(self.code, "prefix-cache is down")


class DownStore(_Broken):
    """The limits' Redis gone: every call fails."""

    async def settle(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("redis went away")


@dataclass
class Rig:
    clock: FakeClock = field(default_factory=FakeClock)
    prefix: DownPrefix = field(default_factory=DownPrefix)
    semantic: FakeSemantic = field(default_factory=FakeSemantic)
    counted: list[tuple[str, str]] = field(default_factory=list)  # the degraded metric
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    def __post_init__(self) -> None:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")
        settings = RouterSettings.from_env(_env(ROUTER_PREFIX_BREAKER_S="5"), TABLE)
        deps = Dependencies(self.semantic, self.prefix, FakeModels(), dict(REPLICAS))
        self.calls = Calls(
            deps, settings, lambda what, why: self.counted.append((what, why)), self.tracer,
            self.clock,
        )  # fmt: skip

    async def plans(self, n: int, every_s: float = EVERY_S) -> None:
        """``n`` requests' Plans, each in a span of its own, ``every_s`` apart."""
        for _ in range(n):
            with self.tracer.start_as_current_span("request"):
                assert await self.calls.plan("t", "sim-small", _request(), ["r1"]) is None
            self.clock.now += every_s

    def degraded_events(self) -> int:
        return sum(
            event.name == "cachemesh.degraded"
            for span in self.exporter.get_finished_spans()
            for event in span.events
        )


def _lines(caplog: pytest.LogCaptureFixture, words: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and words in r.message]


async def test_a_prefix_cache_outage_logs_once_an_interval_and_counts_every_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cachemesh.router")
    rig = Rig()
    await rig.plans(REQUESTS)  # 3 s of an outage
    warned = _lines(caplog, "prefix-cache unavailable", logging.WARNING)
    assert len(warned) == 1 and "not logged" not in warned[0]
    # every failure still counted, and on its request's span
    assert rig.counted == [("prefix-cache", "UNAVAILABLE")] * REQUESTS
    assert rig.degraded_events() == REQUESTS
    rig.clock.now += 10.0  # past the interval: one line, saying how many were not
    await rig.plans(1)
    warned = _lines(caplog, "prefix-cache unavailable", logging.WARNING)
    assert len(warned) == 2
    assert f"{REQUESTS - 1} more since the last such line, not logged" in warned[1]


async def test_an_hours_outage_is_a_line_every_ten_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    await rig.plans(3600, every_s=1.0)  # a request a second for an hour
    assert len(_lines(caplog, "prefix-cache unavailable", logging.WARNING)) == 360
    assert len(rig.counted) == 3600


async def test_a_new_status_code_logs_at_once(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    await rig.plans(10)
    rig.prefix.code = Code.INTERNAL  # no timeout: the breaker stays closed
    await rig.plans(10)
    warned = _lines(caplog, "prefix-cache unavailable", logging.WARNING)
    assert [w.split("(")[1].split(":")[0] for w in warned] == ["UNAVAILABLE", "INTERNAL"]


async def test_each_dependency_has_its_first_line(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(semantic=FakeSemantic(reply=CallFailed(Code.UNAVAILABLE, "L1 is down")))
    await rig.plans(5)
    for _ in range(5):
        assert await rig.calls.lookup("t", _request()) is None
    assert len(_lines(caplog, "prefix-cache unavailable", logging.WARNING)) == 1
    assert len(_lines(caplog, "semantic-cache unavailable", logging.WARNING)) == 1
    assert rig.counted.count(("semantic-cache", "UNAVAILABLE")) == 5


async def test_a_hung_prefix_caches_trials_log_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """An hour's hang with the breaker open (ROUTER_PREFIX_BREAKER_S=5): its trials time out
    every 5 s, each counted; the breaker's WARNING says why, the trials' lines are DEBUG."""
    caplog.set_level(logging.DEBUG, logger="cachemesh.router")
    rig = Rig(prefix=DownPrefix(code=Code.DEADLINE_EXCEEDED))
    await rig.plans(720 * 5, every_s=1.0)  # a request a second, the breaker open
    warned = _lines(caplog, "prefix-cache unavailable", logging.WARNING)
    assert len(warned) == 1  # the first timeout; the breaker's own line says the rest
    assert len(_lines(caplog, "calls timed out in a row", logging.WARNING)) == 1
    trials = _lines(caplog, "prefix-cache unavailable", logging.DEBUG)
    assert len(trials) >= 700
    assert len(rig.counted) == 720 * 5  # every request's skip or failure, counted


async def test_a_failing_limits_store_logs_once_an_interval_each_operation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    counted: list[tuple[str, str]] = []
    limiter = Limiter(
        DownStore(), UniformPolicies(LimitPolicy(requests_per_min=1)), clock, _count,
        counted=lambda what, why: counted.append((what, why)), ages=clock,  # one clock for both
    )  # fmt: skip
    for _ in range(REQUESTS):
        ticket = await limiter.admit("t", _request())
        assert isinstance(ticket, Ticket)  # admitted, unlimited
        limiter.settle(ticket, _answer(1, 1, cost_nanos=5))
        await limiter.drain()
        clock.advance(s=EVERY_S)
    assert len(_lines(caplog, "limits store failed on admit", logging.WARNING)) == 1
    assert len(_lines(caplog, "limits store failed on settle", logging.WARNING)) == 1
    assert len(counted) == 2 * REQUESTS
    clock.advance(s=10)
    await limiter.admit("t", _request())
    warned = _lines(caplog, "limits store failed on admit", logging.WARNING)
    assert len(warned) == 2 and f"{REQUESTS - 1} more since" in warned[1]
    await limiter.close()


async def test_a_limits_store_left_alone_logs_its_trials_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cachemesh.router")
    clock = ManualClock()
    seconds = FakeClock()
    breaker = redis_breaker("limits", 5.0, clock=seconds)
    limiter = Limiter(
        DownStore(), UniformPolicies(LimitPolicy(requests_per_min=1)), clock, _count,
        breaker=breaker,
    )  # fmt: skip
    for _ in range(3600):  # an hour, a request a second
        await limiter.admit("t", _request())
        clock.advance(s=1)
        seconds.now += 1
    assert len(_lines(caplog, "limits store failed on admit", logging.WARNING)) == 1
    assert len(_lines(caplog, "limits store failed on admit", logging.DEBUG)) >= 700
    await limiter.close()
