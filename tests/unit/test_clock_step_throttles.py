"""Log throttles of a process's own lines run on a monotonic clock: a wall clock stepped back
(NTP, a VM resumed) must not silence a warning for the length of the step. The billing
outbox's "kept for the next try" line and the HTTP front's "Gateway unreachable" one; the
limiter's: ``test_router_limits_clock_steps``. Time is injected ManualClocks."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import grpc
import pytest

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code
from services.http_front.gateway import UNREACHABLE, Gateway
from services.router.dependencies import CallFailed
from services.router.outbox import BillingOutbox
from services.tools.stack.ports import free_port

START_MS = 1_700_000_000_000
HOUR_MS = 3_600_000


class Refusing:
    """prefix-cache answering every commit RESOURCE_EXHAUSTED: kept for the next try."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        raise AssertionError("no Plan in a replay")

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        raise CallFailed(Code.RESOURCE_EXHAUSTED, "prefix-cache over its limit")


async def test_a_wall_clock_step_back_does_not_silence_the_outbox_s_kept_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An entry prefix-cache refused once a minute for an hour after the wall clock stepped
    back 60 min: one line, not the 61 its 10-second throttle gives."""
    wall, ages = ManualClock(START_MS), ManualClock(0)
    outbox = BillingOutbox(Refusing(), None, 1.0, 0.01, wall=wall, ages=ages)
    commit = pc.CommitRequest(tenant="t", request_id="r1", phase=pc.COMMIT_PHASE_FINAL)
    await outbox.keep([commit])
    with caplog.at_level(logging.WARNING, logger="cachemesh.router"):
        await outbox.flush()
        wall.advance(ms=-HOUR_MS)
        for _ in range(60):
            wall.advance(ms=60_000)
            ages.advance(ms=60_000)
            await outbox.flush()
    kept = [r for r in caplog.records if "answers kept for the next try" in r.getMessage()]
    assert len(kept) == 61
    await outbox.close()


def _nowhere() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_the_front_s_gateway_line_is_not_silenced_by_a_wall_clock_step_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gateway built as the front builds it (no clock given): the wall clock stepped back
    60 min, then a failure a minute for an hour: one line, where its throttle gives 61. The
    process's two clocks are faked where the clocks read them (no sleeping)."""
    now = {"wall_ns": START_MS * 1_000_000, "monotonic_ns": 0}
    fake = SimpleNamespace(time_ns=lambda: now["wall_ns"], monotonic_ns=lambda: now["monotonic_ns"])
    monkeypatch.setattr("services.common.clock.time", fake)
    refused = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="refused"
    )
    gateway = Gateway(_nowhere(), 1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="cachemesh.http_front"):
            assert gateway._failure(refused).message == UNREACHABLE
            now["wall_ns"] -= HOUR_MS * 1_000_000
            for _ in range(60):
                now["wall_ns"] += 60_000_000_000
                now["monotonic_ns"] += 60_000_000_000
                gateway._failure(refused)
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 61
    finally:
        await gateway.close()
