"""What a limits store is (``LimitStore``: in this process, ``memory_limits``; in Redis,
``redis_limits``): its contract, the rules of time both stores follow (a settle's id remembered,
a clock stepped back, a request's hold on the budgets), and the arithmetic of buckets and
budgets they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from services.router.limit_policy import (
    DAY_BUDGET,
    MONTH_BUDGET,
    MS_PER_MIN,
    REQUESTS,
    LimitPolicy,
    Periods,
    Refusal,
)

# A settle that failed waits in the router (``Limiter``) to be sent again for at most this long.
SETTLE_REPLAY_WINDOW_MS = 15 * 60_000
# How long the store remembers a settle's id (Redis: a marker key a settle leaves, so the
# store holds about the settle rate times this many; 500 answers/s: 60,000 keys, ~11 MB).
# Only a settle whose try may have counted it (a timeout, a connection lost after sending:
# ambiguous) needs it: such a settle is replayed only within AMBIGUOUS_REPLAY_MS of that try,
# while its marker is surely there (the other half covers a script Redis runs late), and is
# otherwise given up (counted lost). A settle the store surely never ran (``SettleNotSent``:
# no connection, or refused: Redis's error reply) needs no marker and is replayed for the
# whole SETTLE_REPLAY_WINDOW_MS.
# A bucket whose time is ahead of the caller's by more than this follows the caller's clock
# (it stepped back); by less, the bucket keeps its time (several routers' calls reach Redis
# out of order: following each back refilled the same interval twice, 3,065 admitted in 3 s
# against a limit of 1,800).
CLOCK_STEP_BACK_MS = 2_000
SETTLE_MARKER_MS = 2 * 60_000
AMBIGUOUS_REPLAY_MS = SETTLE_MARKER_MS // 2
# How long a request's hold on its tenant's budgets (``Hold``) lasts when its end is never told
# (its router killed): its deadline and HOLD_SLACK_MS more (its end's settle), and without a
# deadline the settles' replay window, the most it lasts.
HOLD_MS = SETTLE_REPLAY_WINDOW_MS
HOLD_SLACK_MS = 60_000
# The wait a refusal for budgets held by requests in flight (not spent) tells the caller.
HELD_RETRY_MS = 5_000


@dataclass(frozen=True)
class Hold:
    """What an admitted request holds of its tenant's budgets while it runs: the largest bill
    it can make, under an id of its own (its end releases it once)."""

    id: str
    nanos: int
    ms: int = HOLD_MS  # how long it lasts unreleased (its router died)


def hold_ms(time_remaining_s: float | None) -> int:
    """How long a request's hold lasts unreleased: its deadline and ``HOLD_SLACK_MS`` (its
    end's settle), at most ``HOLD_MS`` (also without a deadline)."""
    if time_remaining_s is None:
        return HOLD_MS
    return min(HOLD_MS, math.ceil(max(time_remaining_s, 0.0) * 1000) + HOLD_SLACK_MS)


def held_refusal(limit: str, held_nanos: int, holding: int, lapse_ms: int = 0) -> Refusal:
    """A budget whose spend is below it, but not with what ``holding`` requests in flight
    hold (the soonest lapsing in ``lapse_ms`` if never released): retried when they may have
    ended, not at the period's end."""
    return Refusal(limit, HELD_RETRY_MS, held_nanos=held_nanos, holding=holding, lapse_ms=lapse_ms)


class SettleNotSent(Exception):
    """A store's settle that surely did not reach it (no connection could be made) or that it
    refused (Redis answered with an error: full, read-only): it counted nothing, so a replay
    at any later time counts it once."""


@dataclass(frozen=True)
class Admission:
    """What an admit asks of a store: one request of ``tenant``'s under ``policy``, reserving
    ``reserve_tokens`` of its token rate and holding ``hold`` of its budgets (None: nothing), at
    ``now_ms`` in ``periods``."""

    tenant: str
    policy: LimitPolicy
    reserve_tokens: int
    now_ms: int
    periods: Periods
    hold: Hold | None = None


@dataclass(frozen=True)
class Settlement:
    """What a settle tells a store: ``tenant``'s request under ``policy`` gives back
    ``refund_tokens`` of its token rate (negative: takes more) and adds ``cost_nanos`` to its
    budgets, at ``now_ms`` in ``periods``, its cost incurred ``age_ms`` before (a killed
    router's open call, an estimate corrected); counted once per ``settle_id`` (when given);
    releasing ``release`` (a hold ``admit`` kept; None: nothing)."""

    tenant: str
    policy: LimitPolicy
    refund_tokens: int
    cost_nanos: int
    now_ms: int
    periods: Periods
    settle_id: str | None = None
    age_ms: int = 0
    release: Hold | None = None


class LimitStore(Protocol):
    # its counts outlive this process (Redis): a correction of an estimate an earlier process
    # counted lands on that count; in this process's memory it would have nothing to correct
    outlives_process: bool

    async def admit(self, asked: Admission) -> Refusal | None:
        """Atomically: refuses ``asked`` when a limit is reached (the token bucket holds less
        than ``tokens_needed``; with a ``hold``, a budget's spend plus the holds of the tenant's
        requests in flight reaches it), else takes one request, reserves its ``reserve_tokens``
        and keeps its ``hold`` for ``HOLD_MS`` or until a settle releases it."""
        ...

    async def refusal_before_count(
        self, tenant: str, policy: LimitPolicy, now_ms: int, periods: Periods
    ) -> Refusal | None:
        """A read, taking nothing: None while the request bucket holds a request (or there is
        no request rate) and no budget is spent, else the refusal ``admit`` would make now for
        the request rate and the budgets (the token rate unread: it needs the prompt's count).
        A request it passes may still be refused by ``admit`` (another router took the last
        request meanwhile, or billed the budget away); one it refuses, ``admit`` would have
        refused then (a request bucket only refills with time; a spent budget stays spent until
        its period ends, but for an estimate's bill corrected down)."""
        ...

    async def settle(self, done: Settlement) -> None:
        """Releases ``done.release`` (a hold ``admit`` kept; nothing when it is gone), gives back
        ``refund_tokens`` (negative: takes more) and adds ``cost_nanos`` to the day's and the
        month's bill (``age_ms``: of the periods that long before ``now_ms``,
        when the cost was incurred: a killed router's open call, an estimate corrected); once
        per ``settle_id`` (when given) within ``SETTLE_MARKER_MS``: a replay of a settle
        counted already counts nothing. Raises ``SettleNotSent`` when the settle surely did
        not reach the store or was refused by it."""
        ...

    async def close(self) -> None: ...


def bucket_level(level: float, at_ms: int, capacity: int, now_ms: int) -> float:
    """A bucket's level at ``now_ms``: refilled at ``capacity`` a minute, never above it; not
    refilled when the clock is behind ``at_ms`` (it stepped back: the store rebases the
    bucket's time to it)."""
    refill = max(0, now_ms - at_ms) * capacity / MS_PER_MIN
    return min(float(capacity), level + refill)


def tokens_needed(reserve_tokens: int, capacity: int) -> int:
    """What the token bucket must hold to admit a reservation: all of it, or a full bucket
    when it is larger; at least one token."""
    return max(1, min(reserve_tokens, capacity))


def refill_wait_ms(level: float, need: float, capacity: int) -> int:
    """The ms until a bucket at ``level`` holds ``need``."""
    return max(1, math.ceil((need - level) * MS_PER_MIN / capacity))


def budgets_spent(
    policy: LimitPolicy, day_nanos: int, month_nanos: int, now_ms: int, periods: Periods
) -> list[Refusal]:
    """The budgets a tenant that spent ``day_nanos`` and ``month_nanos`` is over, in the
    order ``admit`` checks them (the day's first: it is named on a tie)."""
    over: list[Refusal] = []
    if policy.day_budget_nanos is not None and day_nanos >= policy.day_budget_nanos:
        over.append(Refusal(DAY_BUDGET, periods.day_end_ms - now_ms))
    if policy.month_budget_nanos is not None and month_nanos >= policy.month_budget_nanos:
        over.append(Refusal(MONTH_BUDGET, periods.month_end_ms - now_ms))
    return over


def budgets_held(
    policy: LimitPolicy,
    day_nanos: int,
    month_nanos: int,
    held_nanos: int,
    holding: int,
    spent: set[str],
    lapse_ms: int = 0,
) -> list[Refusal]:
    """The budgets (not in ``spent``, those spent already) that a tenant's spend plus what its
    requests in flight hold (``held_nanos``, ``holding`` of them, the soonest lapsing in
    ``lapse_ms``) reaches."""
    over: list[Refusal] = []
    for limit, budget, nanos in (
        (DAY_BUDGET, policy.day_budget_nanos, day_nanos),
        (MONTH_BUDGET, policy.month_budget_nanos, month_nanos),
    ):
        if budget is not None and limit not in spent and nanos + held_nanos >= budget:
            over.append(held_refusal(limit, held_nanos, holding, lapse_ms))
    return over


def requests_refusal(level: float, capacity: int) -> Refusal:
    """The request rate's refusal of a request bucket at ``level`` (below one request)."""
    return Refusal(REQUESTS, refill_wait_ms(level, 1, capacity))


def refilled_at_any_rate(level: float, at_ms: int, now_ms: int) -> bool:
    """Whether a bucket at ``level`` since ``at_ms`` is full at ``now_ms`` whatever its rate
    (at least 1 a minute: a tenant's own rate may change), with a whole unit to spare (no
    rounding of the refill leaves it short), and still is at a time up to
    ``CLOCK_STEP_BACK_MS`` behind (calls out of order): it is then the same as a fresh
    bucket. With m the minutes from ``at_ms`` to that earlier time: m >= 1 and level + m >= 2
    (at a rate r >= 1, level + m * r >= r + 1). Not the same after a larger step back: the
    bucket kept would be taken back to ``level`` (``_level``'s rebase), a fresh one is full."""
    minutes = (now_ms - CLOCK_STEP_BACK_MS - at_ms) / MS_PER_MIN
    return minutes >= 1 and level + minutes >= 2
