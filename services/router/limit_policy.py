"""A tenant's limits and the budget periods they count in (``LimitPolicy``, ``Periods``), what
a limits store finds a request over (``Refusal``), and where the limiter reads each tenant's
limits from (``Policies``). The limits themselves: ``limits``'s module doc."""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Protocol

NANOS_PER_DOLLAR = 1_000_000_000
MS_PER_MIN = 60_000


@dataclass(frozen=True)
class LimitPolicy:
    """One tenant's limits; ``None`` = no such limit."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    day_budget_nanos: int | None = None
    month_budget_nanos: int | None = None

    @property
    def budgeted(self) -> bool:
        """Whether a day's or a month's budget is set."""
        return self.day_budget_nanos is not None or self.month_budget_nanos is not None

    @property
    def active(self) -> bool:
        return any(
            v is not None
            for v in (
                self.requests_per_min,
                self.tokens_per_min,
                self.day_budget_nanos,
                self.month_budget_nanos,
            )
        )


@dataclass(frozen=True)
class Periods:
    """The budget periods containing ``now``: their ids and when each ends (UTC)."""

    day: str  # "2026-05-03"
    month: str  # "2026-05"
    day_end_ms: int
    month_end_ms: int

    @classmethod
    def at(cls, now_ms: int) -> Periods:
        t = time.gmtime(now_ms // 1000)
        day_start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) * 1000
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return cls(
            day=f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}",
            month=f"{t.tm_year:04d}-{t.tm_mon:02d}",
            day_end_ms=day_start + 86_400_000,
            month_end_ms=calendar.timegm((year, month, 1, 0, 0, 0)) * 1000,
        )

    def previous(self) -> tuple[str, str]:
        """The ids of the day and the month before these."""
        year, month = (int(part) for part in self.month.split("-"))
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
        return Periods.at(self.day_end_ms - 86_400_000 - 1).day, f"{year:04d}-{month:02d}"


# What ``LimitStore.admit`` found over its limit (None: admitted).
DAY_BUDGET = "day_budget"
MONTH_BUDGET = "month_budget"
REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(frozen=True)
class Refusal:
    """The store's verdict: which limit, and the wait in ms (a bucket's refill time); for the
    token rate, the whole tokens the bucket holds now (0 when it is empty or below zero).
    ``also``: the other limits the request is over, whose waits are no longer (longest
    first)."""

    limit: str
    wait_ms: int
    free_tokens: int = 0
    also: tuple[str, ...] = ()
    # a budget not spent but held by the tenant's requests in flight: what they hold, and how
    # many they are (``Hold``)
    held_nanos: int = 0
    holding: int = 0
    # when the soonest of those holds lapses unreleased (its router stopped without ending its
    # request): the longest the refusal lasts if none of them ends sooner
    lapse_ms: int = 0


def longest(over: list[Refusal]) -> Refusal:
    """One refusal for every limit a request is over (each checked): the longest wait, naming
    that limit and the others. Waiting for the first limit checked (the day's end) left the
    caller refused again when it came back (the month's budget still spent)."""
    ranked = sorted(over, key=lambda r: -r.wait_ms)  # stable: the check order on a tie
    first = ranked[0]
    return Refusal(
        first.limit,
        first.wait_ms,
        first.free_tokens,
        tuple(r.limit for r in ranked[1:]),
        first.held_nanos,
        first.holding,
        first.lapse_ms,
    )


class Policies(Protocol):
    def for_tenant(self, tenant: str) -> LimitPolicy: ...

    async def admitting(self, tenant: str) -> LimitPolicy:
        """``for_tenant`` for an admit: after the re-read of a change of the tenants' limits
        this router has seen or is reading (bounded), not the limits read before it."""
        ...

    def counts_every_spend(self) -> bool:
        """Whether a tenant with no limit has its cost counted all the same: a budget may be
        given to it at any time (``tenant_limits``), and applies to what it spent already."""
        ...


@dataclass(frozen=True)
class UniformPolicies:
    """The same limits for every tenant."""

    policy: LimitPolicy

    def for_tenant(self, tenant: str) -> LimitPolicy:
        return self.policy

    async def admitting(self, tenant: str) -> LimitPolicy:
        return self.policy

    def counts_every_spend(self) -> bool:
        return False  # every tenant's the same: no limit is no limit for anyone
