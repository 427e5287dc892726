"""The router's breakers as an operator meets them: their log lines and their counter.

A dependency that stays hung is tried again every ``ROUTER_*_BREAKER_S``, and each trial that
times out leaves it alone again. prefix-cache's breaker logged a WARNING at each of those
re-opens (an hour's hang at 5 s: 720 lines), where semantic-cache's logged one WARNING per
hang and DEBUG at its re-opens; the Redis clients' logged nothing at a re-open and a WARNING
when Redis answered again. Now every breaker logs one WARNING as a hang starts, a DEBUG line
at each re-open and one INFO line when the dependency answers again. And no metric counted
prefix-cache's or semantic-cache's breaker: ``cachemesh_router_breaker_opens_total
{dependency}`` counts each hang (its first opening), not its re-opens.

Time is a fake clock the hung dependency moves by each call's deadline: nothing sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from cachemesh.v1 import gateway_pb2 as pb
from services.common.metrics import TenantLabels
from services.router.breaker import redis_breaker
from services.router.dependencies import Dependencies
from services.router.metrics import RouterMetrics
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
from tests.unit.test_router_prefix_hang import HungPrefix
from tests.unit.test_router_semantic_hang import HungSemantic, _env

# an hour's hang, tried again every BREAKER_S: at the default 5 s, 720 trials (12 s of a
# loaded machine's suite for prefix-cache's case); at 60 s, 60 trials prove the same (one
# WARNING, one opening counted: a WARNING at each re-open gives 61 of them)
BREAKER_S = 60.0
TRIALS = 60
OPENS = "cachemesh_router_breaker_opens_total"
TENANT_OPENS = "cachemesh_router_l1_tenant_breaker_opens_total"
# what each breaker's lines name (the re-opens', the WARNING's, the INFO's)
BREAKER_WORDS = ("left alone", "BREAKER_S", "answers again")


class Stack:
    """A pipeline with the router's metrics, over a hung prefix-cache or semantic-cache."""

    def __init__(self, hung: str) -> None:
        self.clock = FakeClock()
        self.prefix = HungPrefix(self.clock) if hung == "prefix-cache" else None
        self.semantic = HungSemantic(clock=self.clock) if hung == "semantic-cache" else None
        self.registry = CollectorRegistry()
        env = _env(ROUTER_PREFIX_BREAKER_S=str(BREAKER_S), ROUTER_SEMANTIC_BREAKER_S=str(BREAKER_S))
        deps = Dependencies(
            self.semantic or FakeSemantic(), self.prefix or FakePrefix(), FakeModels(), REPLICAS
        )
        router = (load_router_model(), RouterCard.load().default_threshold, None)
        self.pipeline = Pipeline(
            deps, TABLE, TOKENIZER, trace.NoOpTracer(), RouterSettings.from_env(env, TABLE),
            router, clock=self.clock, metrics=RouterMetrics(self.registry, TenantLabels(4)),
        )  # fmt: skip

    def calls(self) -> int:
        if self.prefix is not None:
            return len(self.prefix.calls)
        assert self.semantic is not None
        return len(self.semantic.lookups)

    def back(self) -> None:
        if self.prefix is not None:
            self.prefix.answers = 10**9
        if self.semantic is not None:
            self.semantic.hung = False

    async def ask(self) -> pb.CompleteResponse:
        run = self.pipeline.run("tenant-a", _request(), time_remaining_s=10.0)
        end = [chunk async for chunk in run][-1].end
        await self.pipeline.drain()
        return end

    async def hang(self, trials: int = TRIALS) -> None:
        """A hang (an hour's by default): three calls time out, then one more at each trial."""
        made = self.calls()
        for _ in range(3):
            await self.ask()
        for _ in range(trials):
            self.clock.now += BREAKER_S
            await self.ask()  # tried again: times out, left alone again
            await self.ask()  # left alone: not asked
        assert self.calls() - made == 3 + trials
        self.clock.now += BREAKER_S
        self.back()
        await self.ask()  # tried again: answers
        assert self.calls() > made + 3 + trials

    def opens(self, dependency: str) -> float | None:
        return self.registry.get_sample_value(OPENS, {"dependency": dependency})


def _levels(caplog: pytest.LogCaptureFixture, name: str) -> dict[str, int]:
    """How many of the breaker's lines about ``name`` were logged at each level."""
    counts: dict[str, int] = {}
    for record in caplog.records:
        text = record.getMessage()
        skip = "call skipped" in text  # a call not made: its own DEBUG line, not the breaker's
        if text.startswith(name) and not skip and any(word in text for word in BREAKER_WORDS):
            counts[record.levelname] = counts.get(record.levelname, 0) + 1
    return counts


@pytest.mark.parametrize("dependency", ["prefix-cache", "semantic-cache"])
async def test_an_hour_long_hang_logs_one_warning_and_is_counted_once(
    dependency: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    stack = Stack(dependency)
    await stack.hang()
    assert _levels(caplog, dependency) == {"WARNING": 1, "DEBUG": TRIALS, "INFO": 1}
    assert stack.opens(dependency) == 1  # one hang, however often it was tried meanwhile
    assert stack.registry.get_sample_value(TENANT_OPENS) == 0  # L1's hang, no tenant's
    other = "semantic-cache" if dependency == "prefix-cache" else "prefix-cache"
    assert stack.opens(other) == 0
    await stack.ask()
    # a second hang is a second WARNING line and a second opening
    if stack.prefix is not None:
        stack.prefix.answers = len(stack.prefix.calls)
    if stack.semantic is not None:
        stack.semantic.hung = True
    await stack.hang(trials=10)
    assert _levels(caplog, dependency) == {"WARNING": 2, "DEBUG": TRIALS + 10, "INFO": 2}
    assert stack.opens(dependency) == 2


def test_each_dependency_is_counted_from_zero_at_start() -> None:
    stack = Stack("prefix-cache")  # for rate() and alerts: a series before its first hang
    assert stack.opens("prefix-cache") == stack.opens("semantic-cache") == 0
    assert stack.registry.get_sample_value(TENANT_OPENS) == 0


def _redis_hang(open_s: float, opened: Callable[[str], None]) -> None:
    """The limits' Redis breaker through a hang: three failures, then a failed trial at each
    wait's end, then an answer."""
    clock = FakeClock()
    breaker = redis_breaker("limits", open_s, opened, clock)
    for _ in range(3):
        breaker.failed()
    for _ in range(TRIALS):
        clock.now += open_s
        assert not breaker.open()  # the trial
        breaker.failed()
        assert breaker.open()
    clock.now += open_s
    assert not breaker.open()
    breaker.answered()


def test_a_redis_breaker_logs_as_the_others_and_keeps_counting_each_opening(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Redis breakers' counter keeps its meaning (each opening, the re-opens too: a
    dashboard built on it reads as before); their lines are the other breakers' levels."""
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    opened: list[str] = []
    _redis_hang(BREAKER_S, opened.append)
    assert opened == ["limits"] * (1 + TRIALS)
    assert _levels(caplog, "limits Redis") == {"WARNING": 1, "DEBUG": TRIALS, "INFO": 1}
