"""A dependency call cut short by its request's own (the client's) deadline is no degradation of
that dependency.

A soak of 300 calls with a 30 ms deadline counted 92 ``cachemesh_router_degraded_total
{dependency="prefix-cache",reason="DEADLINE_EXCEEDED"}`` and logged "prefix-cache unavailable
(DEADLINE_EXCEEDED); degrading" WARNINGs, though prefix-cache answered every call given time:
``CachemeshDependencyDegraded`` fires above 0.1 degradations a Gateway call. A call given less
than half of the router's own limit for it (``ROUTER_PREFIX_TIMEOUT_S``,
``ROUTER_SEMANTIC_TIMEOUT_S``, ``ROUTER_SEMANTIC_LEASE_WAIT_S``) because the client's deadline
left no more, or not made because it left none, now counts as ``client_deadline`` (the alert
leaves it out), at DEBUG, and not toward the dependency's breaker, as the breakers already
judged. Time is a fake clock the slow dependency moves by each call's deadline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.router.calls import Calls, PrefixWindow, warm_commit
from services.router.dependencies import CallFailed, Dependencies
from tests.unit.test_router_pipeline import FakeClock, FakePrefix, _request, _settings
from tests.unit.test_router_semantic_hang import HungSemantic

CLIENT_DEADLINE = "client_deadline"


@dataclass
class SlowPrefix:
    """prefix-cache answering within ``answer_s``: a call given less fails DEADLINE_EXCEEDED
    once its deadline passed on ``clock``, as a gRPC call does."""

    clock: FakeClock
    answer_s: float = 0.05
    calls: list[str] = field(default_factory=list)
    inner: FakePrefix = field(default_factory=FakePrefix)

    def _wait(self, method: str, deadline_s: float) -> None:
        self.calls.append(method)
        if deadline_s < self.answer_s:
            self.clock.now += deadline_s
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.clock.now += self.answer_s

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        self._wait("Plan", deadline_s)
        return await self.inner.plan(request, deadline_s)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self._wait(pc.CommitPhase.Name(request.phase), deadline_s)
        return await self.inner.commit(request, deadline_s)


@dataclass
class Rig:
    clock: FakeClock = field(default_factory=FakeClock)
    counted: list[tuple[str, str]] = field(default_factory=list)
    answer_s: float = 0.05

    def __post_init__(self) -> None:
        self.prefix = SlowPrefix(self.clock, self.answer_s)
        self.semantic = HungSemantic(clock=self.clock)
        deps = Dependencies(
            semantic=cast(Any, self.semantic),
            prefix=cast(Any, self.prefix),
            model=cast(Any, None),
            models={},
        )
        self.calls = Calls(
            deps, _settings(), lambda what, why: self.counted.append((what, why)), None, self.clock
        )

    def window(self, deadline_s: float) -> PrefixWindow:
        return PrefixWindow(self.clock.now + deadline_s)

    async def request_with_prefix(self, window: PrefixWindow) -> None:
        """A request's Plan, WARM and FINAL within ``window``."""
        request = _request()
        plan = await self.calls.plan("t", "sim-small", request, ["r"], window)
        warm = warm_commit("t", "c1", "sim-small", "r", 0, None, "plan-1" if plan else "", False)
        await self.calls.commit_warm(warm, request, window)
        await self.calls.commit_final(
            "t", request, "c1", "sim-small", "r", 3, 0, "sim-large",
            pc.ProviderUsage(), window,
        )  # fmt: skip


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("deadline_s", [0.06, 0.03, 0.0])
async def test_prefix_calls_cut_by_the_clients_deadline_are_no_prefix_cache_degradation(
    caplog: pytest.LogCaptureFixture, deadline_s: float
) -> None:
    """A Plan given 30 ms of a 60 ms deadline (prefix-cache answers in 50 ms), or none left:
    the Plan, and the WARM and FINAL it leaves unsent, are the client's deadline's."""
    rig = Rig()
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    for _ in range(5):  # more than the breaker's run of timeouts
        await rig.request_with_prefix(rig.window(deadline_s))
    assert rig.counted and set(rig.counted) == {("prefix-cache", CLIENT_DEADLINE)}, rig.counted
    assert _warnings(caplog) == []
    # prefix-cache is not left alone: a request with time is served
    window = rig.window(10.0)
    assert await rig.calls.plan("t", "sim-small", _request(), ["r"], window) is not None


async def test_a_warm_cut_by_the_clients_deadline_is_no_degradation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Plan answered within a 130 ms deadline; the WARM, given half of what is left
    (40 ms), is cut by it."""
    rig = Rig()
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    await rig.request_with_prefix(rig.window(0.13))
    assert rig.prefix.calls == ["Plan", "COMMIT_PHASE_WARM"]
    assert rig.counted == [("prefix-cache", CLIENT_DEADLINE)] * 2  # the WARM, the FINAL not sent
    assert _warnings(caplog) == []


async def test_a_prefix_cache_slower_than_half_its_limit_is_still_degraded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung prefix-cache, within a 3 s deadline (each call given 1.45 s, over half of
    ROUTER_PREFIX_TIMEOUT_S): a degradation, its WARNING, and its breaker counts."""
    rig = Rig(answer_s=100.0)
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    for _ in range(3):
        await rig.request_with_prefix(rig.window(3.0))
    assert set(rig.counted) == {("prefix-cache", "DEADLINE_EXCEEDED")}
    assert any("prefix-cache unavailable" in m for m in _warnings(caplog))
    calls = len(rig.prefix.calls)
    await rig.request_with_prefix(rig.window(3.0))
    assert len(rig.prefix.calls) == calls  # left alone


async def test_a_lookup_cut_by_the_clients_deadline_is_no_semantic_cache_degradation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A first Lookup given 15 ms of a 30 ms deadline, which L1 (hung or not) cannot answer."""
    rig = Rig()
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    for _ in range(5):
        assert await rig.calls.lookup("t", _request(), deadline=rig.clock.now + 0.03) is None
    assert rig.counted == [("semantic-cache", CLIENT_DEADLINE)] * 5
    assert _warnings(caplog) == []
    rig.counted.clear()
    for _ in range(3):  # given its whole ROUTER_SEMANTIC_TIMEOUT_S: L1's fault, as before
        assert await rig.calls.lookup("t", _request(), deadline=rig.clock.now + 10.0) is None
    assert rig.counted == [("semantic-cache", "DEADLINE_EXCEEDED")] * 3
    assert any("semantic-cache unavailable" in m for m in _warnings(caplog))
