"""The limiter's windows over what lives in this process (the settle replay's, a throttled log
line's) run on a monotonic clock, its budgets on the wall clock: a step of the wall clock (NTP,
a VM resumed) neither drops settles nor replays an ambiguous one past its marker, nor silences
warnings; and the in-process store keeps the previous day's and month's spend, so a step back
over midnight does not grant a spent day again. Time is injected ManualClocks."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.router.limit_denials import Denial
from services.router.limit_policy import NANOS_PER_DOLLAR, LimitPolicy, Periods, UniformPolicies
from services.router.limit_store import AMBIGUOUS_REPLAY_MS, SETTLE_REPLAY_WINDOW_MS, SettleNotSent
from services.router.limit_tickets import Ticket
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore

START_MS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
MIDNIGHT_MS = 1_700_006_400_000  # 2023-11-15 00:00:00 UTC


def _request() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="hi")])],
        max_tokens=10,
    )


def _answer(cost_nanos: int) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        served_by=pb.LAYER_MODEL,
        usage=pb.Usage(input_tokens=4, output_tokens=10),
        cost=pb.Cost(cost_nanos=cost_nanos),
    )


def _count(request: pb.CompleteRequest) -> int:
    return 4


class Outage(MemoryLimitStore):
    """Settles fail while ``down``: surely not sent (no connection), or, ``late`` times first,
    counted but answered too late (ambiguous: the try may have counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.late = 0

    async def settle(self, *args: Any, **kwargs: Any) -> None:
        if self.late:
            self.late -= 1
            await super().settle(*args, **kwargs)
            raise TimeoutError("no answer in time")
        if self.down:
            raise SettleNotSent("no connection to Redis")
        await super().settle(*args, **kwargs)


async def _admitted(limiter: Limiter) -> Ticket:
    ticket = await limiter.admit("t", _request())
    assert isinstance(ticket, Ticket), ticket
    return ticket


async def test_a_wall_clock_step_forward_drops_no_pending_settle() -> None:
    """Five $0.30 settles pending through a 2 s outage while the wall clock stepped forward
    16 min: all were dropped past the 15-min replay window ($1.50 lost) and the tenant was
    admitted over its $1 day budget. The window runs on the limiter's own monotonic clock
    (its default: the real one, which moves milliseconds here)."""
    store, clock, lost = Outage(), ManualClock(START_MS), list[int]()
    policy = LimitPolicy(day_budget_nanos=NANOS_PER_DOLLAR)
    limiter = Limiter(store, UniformPolicies(policy), clock, _count, lost=lost.append)
    for _ in range(5):
        limiter.settle(await _admitted(limiter), _answer(300_000_000))
    await limiter.drain()
    assert limiter.pending == 5
    clock.advance(ms=2_000 + SETTLE_REPLAY_WINDOW_MS + 60_000)
    store.down = False
    await limiter.replay_pending()
    assert lost == [] and limiter.pending == 0
    assert isinstance(await limiter.admit("t", _request()), Denial)
    await limiter.close()


async def test_an_ambiguous_settle_is_given_up_on_the_monotonic_clock_whatever_the_wall() -> None:
    """A settle whose try timed out after the store counted it, the wall clock then stepped
    back 300 s: the replay, judged on the wall, was sent though the marker that makes it count
    once may have lapsed (counted twice). Past ``AMBIGUOUS_REPLAY_MS`` on the monotonic
    clock it is given up, whatever the wall clock says."""
    store, clock, ages, lost = Outage(), ManualClock(START_MS), ManualClock(0), list[int]()
    store.late = 1
    policy = LimitPolicy(day_budget_nanos=100 * NANOS_PER_DOLLAR)
    limiter = Limiter(store, UniformPolicies(policy), clock, _count, lost=lost.append, ages=ages)
    limiter.settle(await _admitted(limiter), _answer(1_000))
    await limiter.drain()
    assert limiter.pending == 1
    clock.advance(ms=-300_000)
    ages.advance(ms=AMBIGUOUS_REPLAY_MS + 1)
    store.down = False
    await limiter.replay_pending()
    assert lost == [1] and limiter.pending == 0  # not sent again: the late try's count stays
    await limiter.close()


async def test_a_wall_clock_step_back_does_not_silence_the_failure_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Admits failing once a minute for an hour after the wall clock stepped back 60 min:
    none was logged (the throttle's last line was 'in the future'); one a minute now."""

    class Broken(MemoryLimitStore):
        async def admit(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("Redis is down")

    clock, ages = ManualClock(START_MS), ManualClock(0)
    policy = UniformPolicies(LimitPolicy(requests_per_min=10))
    limiter = Limiter(Broken(), policy, clock, _count, ages=ages)
    with caplog.at_level(logging.WARNING, logger="cachemesh.router"):
        await limiter.admit("t", _request())
        clock.advance(ms=-3_600_000)
        for _ in range(60):
            clock.advance(ms=60_000)
            ages.advance(ms=60_000)
            await limiter.admit("t", _request())
    warned = [r for r in caplog.records if "limits store failed on admit" in r.getMessage()]
    assert len(warned) == 61
    await limiter.close()


async def test_a_step_back_over_midnight_finds_the_spent_day_still_spent() -> None:
    """$1 of a $1 day spent at 23:59:50, a $0.01 request settled at 00:00:05, then the wall
    clock stepped back 30 s: the in-process store had forgotten the first day's spend at the
    second day's first settle and admitted 10 requests of $0.10 ($1 more) on the spent day."""
    clock = ManualClock(MIDNIGHT_MS - 10_000)
    store = MemoryLimitStore()
    policy = LimitPolicy(day_budget_nanos=NANOS_PER_DOLLAR)
    limiter = Limiter(store, UniformPolicies(policy), clock, _count)
    limiter.settle(await _admitted(limiter), _answer(NANOS_PER_DOLLAR))
    await limiter.drain()
    clock.advance(ms=15_000)
    limiter.settle(await _admitted(limiter), _answer(10_000_000))
    await limiter.drain()
    clock.advance(ms=-30_000)
    assert isinstance(await limiter.admit("t", _request()), Denial)
    await limiter.close()


def test_the_previous_periods_cross_a_year() -> None:
    new_year = Periods.at(1_704_067_200_000 + 5 * 3_600_000)  # 2024-01-01 05:00 UTC
    assert new_year.previous() == ("2023-12-31", "2023-12")
    assert Periods.at(START_MS).previous() == ("2023-11-13", "2023-10")
