"""Per-tenant limits at the Gateway: request rate, token rate, dollar budgets a day and a month.

A grpc-free core. ``Limiter.admit`` runs before a request reaches the pipeline; a tenant over
its limits is refused with a ``Denial`` (what was exceeded, and how long to wait: every limit
is checked, and the wait is the longest), which the servicer turns into
``RESOURCE_EXHAUSTED`` with ``google.rpc.RetryInfo``.

- Request rate: a bucket of ``requests_per_min`` requests, refilled continuously; each request
  takes one. Under a token rate, a request whose prompt is large (``READ_FIRST_CHARS``) has
  the request rate and the budgets read first (``LimitStore.refusal_before_count``): over the rate
  or a spent budget, it is refused before its prompt is counted (a flood of large prompts past
  the rate, or from a tenant whose budget is spent until the day or the month ends, had the
  router tokenize each, on the CPU every tenant shares, only to refuse it), and its refusal
  names the request rate and the budgets it is over, not the token rate, which needs the
  count. A smaller prompt is counted first, as its count costs less than that read's round
  trip to the store, and its refusal names every limit it is over.
- Token rate: a bucket of ``tokens_per_min`` tokens. A request reserves its prompt's tokens (the
  canonical prompt counted by the router's tokenizer, as an L1 hit's baseline is) plus its
  ``max_tokens`` (the row's ``max_output_tokens`` when the row thinks outside ``max_tokens``:
  ``ModelSpec.most_output_tokens``, as the budgets' hold), and is admitted while the bucket
  holds that reservation, or is full when the reservation is larger than the bucket (else it
  could never pass; it takes the bucket below zero, and later requests wait for the refill).
  When it ends the reservation is replaced by what it used: input tokens, cache writes and
  output tokens that reached a model (cache reads are not counted, as Anthropic's cache-aware
  limits do not; a semantic-cache hit counts as a request, no tokens).
  A request that ends with no answer before its first model call was sent (cancelled, out of
  time or refused during its L1 Lookup, a wait on an identical request's call, its Plan, or
  its admit itself) gives its reservation back whole (``Limiter.unused``, by the rule of
  ``Limiter.finish`` that the Gateway and the estimator's replay both count an end with): it
  used no model tokens; so does one whose model calls were all refused by their replicas
  before their start (nothing produced, nothing billed: ``ModelUse.model_refused``). One that
  fails or is cut after a model call that was not refused so keeps its reservation, unless its
  call was billed without an answer (the caller left, or the replica was cut, after the
  prefill): the billed tokens replace it.
- Budgets: a request is admitted while the tenant's bill for the current UTC day (month) is
  below the budget; each answer adds its ``cost_nanos`` (the prefix-cache bill, or the
  estimate the router serves when prefix-cache is down, counted as the outbox journals the
  bill, ``Limiter.count_estimate``, and corrected by what prefix-cache bills when the outbox
  replays it: ``Limiter.reconcile``). Under a budget each request also holds, while it runs,
  the largest bill it can make (``Hold``: its prompt at the dearest of the row's input and
  cache-write prices, and its ``max_tokens`` at the output price; ``auto``'s: the largest
  of its tiers'), and is admitted only while the bill plus what the tenant's requests in
  flight hold is below the budget: N requests racing the last dollar of a budget took it
  past by N bills (39 answers in flight: $0.0449 against a $0.01 budget), now by at most
  one. Its end gives the hold back (with its cost counted, in one settle); a hold whose
  router died lapses a minute after its request's deadline (``hold_ms``; ``HOLD_MS`` without
  one). The last request admitted may still take the bill past the budget (by at most its
  own bill); the next one is refused until the period ends.

The state lives in a ``LimitStore``: in this process (``MemoryLimitStore``), or in Redis
(``services.router.redis_limits``) so that every router of a deployment shares it.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import Clock, MonotonicClock, Throttle, Throttles, suppressed
from services.common.prompt import prompt_chars
from services.common.span_events import record_event
from services.router.breaker import Breaker

log = logging.getLogger("cachemesh.router.limits")

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


DEFAULT_TIMEOUT_S = 0.5  # ROUTER_LIMITS_TIMEOUT_S
# A prompt of at least this many characters has the request rate and the budgets read before
# it is counted (module doc): tokenizing 16 KiB of new text takes ~0.8 ms (~50 ms a
# megabyte), a few Redis round trips.
READ_FIRST_CHARS = 16_384
# Settles that failed (the store down or silent) wait in the router for it to answer again:
# at most this many, for at most this long, tried again this often.
MAX_PENDING_SETTLES = 10_000
SETTLE_REPLAY_WINDOW_MS = 15 * 60_000
SETTLE_REPLAY_S = 1.0
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


LOST_LOG_INTERVAL_MS = 60_000  # settles lost are logged at most once in this interval
# a store failure (on admit, on settle) of one kind is logged at most once in this interval, the
# first at once: a Redis down at 100 requests a second was 200 WARNING lines a second
FAILED_LOG_INTERVAL_MS = 10_000


class LimitStore(Protocol):
    # its counts outlive this process (Redis): a correction of an estimate an earlier process
    # counted lands on that count; in this process's memory it would have nothing to correct
    outlives_process: bool

    async def admit(
        self,
        tenant: str,
        policy: LimitPolicy,
        reserve_tokens: int,
        now_ms: int,
        periods: Periods,
        hold: Hold | None = None,
    ) -> Refusal | None:
        """Atomically: refuses when a limit is reached (the token bucket holds less than
        ``tokens_needed``; with ``hold``, a budget's spend plus the holds of the tenant's
        requests in flight reaches it), else takes one request, reserves ``reserve_tokens``
        and keeps ``hold`` for ``HOLD_MS`` or until a settle releases it."""
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

    async def settle(
        self,
        tenant: str,
        policy: LimitPolicy,
        refund_tokens: int,
        cost_nanos: int,
        now_ms: int,
        periods: Periods,
        settle_id: str | None = None,
        age_ms: int = 0,
        release: Hold | None = None,
    ) -> None:
        """Releases ``release`` (a hold ``admit`` kept; nothing when it is gone), gives back
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


# Buckets a write of one looks at for ones to forget (``MemoryLimitStore._sweep``): more
# than the one it writes, so the map shrinks back after a burst of tenants.
SWEEP_BUCKETS = 4


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


@dataclass
class _Bucket:
    level: float
    at_ms: int


class MemoryLimitStore:
    """The limits' state in this process (one router; ``ROUTER_LIMITS_REDIS_URL`` unset)."""

    outlives_process = False

    def __init__(self) -> None:
        # (tenant, kind) -> its bucket, those written longest ago first; a bucket refilled is
        # forgotten (a fresh one is the same), on access and by the sweep of each write: every
        # tenant ever seen was kept for the life of the process
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._spent: dict[tuple[str, str], int] = {}  # (tenant, period id) -> nanos
        # tenant -> its holds (id -> nanos, until when), oldest first, and their sum
        self._holds: dict[str, dict[str, tuple[int, int]]] = {}
        self._held: dict[str, int] = {}

    def _holding(self, tenant: str, now_ms: int) -> tuple[int, int]:
        """What ``tenant``'s requests in flight hold of its budgets, and how many they are,
        once the lapsed holds are gone (the oldest first: every hold lasts ``HOLD_MS``)."""
        holds = self._holds.get(tenant)
        if holds is None:
            return 0, 0
        while holds:
            hold_id = next(iter(holds))
            nanos, until_ms = holds[hold_id]
            if until_ms > now_ms:
                break
            del holds[hold_id]
            self._held[tenant] -= nanos
        if not holds:
            del self._holds[tenant]
            self._held.pop(tenant, None)
            return 0, 0
        return self._held[tenant], len(holds)

    def _soonest_lapse_ms(self, tenant: str, now_ms: int) -> int:
        """In how long the soonest of ``tenant``'s holds lapses unreleased (0: none)."""
        holds = self._holds.get(tenant)
        if not holds:
            return 0
        return max(min(until for _, until in holds.values()) - now_ms, 0)

    def _release(self, tenant: str, hold: Hold) -> None:
        holds = self._holds.get(tenant)
        if holds is None or holds.pop(hold.id, None) is None:
            return
        self._held[tenant] -= hold.nanos
        if not holds:
            del self._holds[tenant]
            self._held.pop(tenant, None)

    def _level(self, tenant: str, kind: str, capacity: int, now_ms: int) -> float:
        key = (tenant, kind)
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(capacity)
        # The clock stepped back (NTP, a VM resumed): the bucket's time follows it, with no
        # refill for the step. Refilling only from the time ahead froze an emptied bucket for
        # the whole step (a refusal keeps no time) while each refusal said "retry in 1 s". A
        # time behind by less than CLOCK_STEP_BACK_MS is not a step (on Redis: routers' calls
        # applied out of order) and refills nothing.
        if now_ms < bucket.at_ms - CLOCK_STEP_BACK_MS:
            bucket.at_ms = now_ms
        if refilled_at_any_rate(bucket.level, bucket.at_ms, now_ms):
            del self._buckets[key]
            return float(capacity)
        return bucket_level(bucket.level, bucket.at_ms, capacity, now_ms)

    def _put(self, tenant: str, kind: str, bucket: _Bucket) -> None:
        """Writes a bucket (last in the map) and sweeps."""
        key = (tenant, kind)
        self._buckets.pop(key, None)
        self._buckets[key] = bucket
        self._sweep(bucket.at_ms)

    def _sweep(self, now_ms: int) -> None:
        """Forgets the refilled among the ``SWEEP_BUCKETS`` first in the map; the others go
        last (one whose time is ahead of a clock stepped back must not stop the sweep)."""
        for key in list(itertools.islice(self._buckets, SWEEP_BUCKETS)):
            bucket = self._buckets.pop(key)
            if not refilled_at_any_rate(bucket.level, bucket.at_ms, now_ms):
                self._buckets[key] = bucket

    def _budgets_spent(
        self, tenant: str, policy: LimitPolicy, now_ms: int, periods: Periods
    ) -> list[Refusal]:
        day = self._spent.get((tenant, periods.day), 0)
        month = self._spent.get((tenant, periods.month), 0)
        return budgets_spent(policy, day, month, now_ms, periods)

    async def refusal_before_count(
        self, tenant: str, policy: LimitPolicy, now_ms: int, periods: Periods
    ) -> Refusal | None:
        over = self._budgets_spent(tenant, policy, now_ms, periods)
        if policy.requests_per_min is not None:
            requests = self._level(tenant, REQUESTS, policy.requests_per_min, now_ms)
            if requests < 1:
                over.append(requests_refusal(requests, policy.requests_per_min))
        return longest(over) if over else None

    async def admit(
        self,
        tenant: str,
        policy: LimitPolicy,
        reserve_tokens: int,
        now_ms: int,
        periods: Periods,
        hold: Hold | None = None,
    ) -> Refusal | None:
        day = self._spent.get((tenant, periods.day), 0)
        month = self._spent.get((tenant, periods.month), 0)
        over = budgets_spent(policy, day, month, now_ms, periods)
        if hold is not None:
            held, holding = self._holding(tenant, now_ms)
            spent = {r.limit for r in over}
            lapse = self._soonest_lapse_ms(tenant, now_ms)
            over += budgets_held(policy, day, month, held, holding, spent, lapse)
        requests = tokens = 0.0
        if policy.requests_per_min is not None:
            requests = self._level(tenant, REQUESTS, policy.requests_per_min, now_ms)
            if requests < 1:
                over.append(requests_refusal(requests, policy.requests_per_min))
        if policy.tokens_per_min is not None:
            tokens = self._level(tenant, TOKENS, policy.tokens_per_min, now_ms)
            need = tokens_needed(reserve_tokens, policy.tokens_per_min)
            if tokens < need:
                wait = refill_wait_ms(tokens, need, policy.tokens_per_min)
                over.append(Refusal(TOKENS, wait, max(0, math.floor(tokens))))
        if over:
            return longest(over)
        if policy.requests_per_min is not None:
            self._put(tenant, REQUESTS, _Bucket(requests - 1, now_ms))
        if policy.tokens_per_min is not None:
            self._put(tenant, TOKENS, _Bucket(tokens - reserve_tokens, now_ms))
        if hold is not None and hold.nanos > 0:
            # (the in-process holds die with the process: one that outlives its request's
            # deadline is gone once those admitted before it are)
            self._holds.setdefault(tenant, {})[hold.id] = (hold.nanos, now_ms + hold.ms)
            self._held[tenant] = self._held.get(tenant, 0) + hold.nanos
        return None

    async def settle(
        self,
        tenant: str,
        policy: LimitPolicy,
        refund_tokens: int,
        cost_nanos: int,
        now_ms: int,
        periods: Periods,
        settle_id: str | None = None,
        age_ms: int = 0,
        release: Hold | None = None,
    ) -> None:
        # never fails, so never replayed: its settle ids need no memory
        if release is not None:
            self._release(tenant, release)
        spent = Periods.at(now_ms - age_ms) if age_ms else periods  # where the cost counts
        if policy.tokens_per_min is not None and refund_tokens:
            level = self._level(tenant, TOKENS, policy.tokens_per_min, now_ms)
            refunded = min(float(policy.tokens_per_min), level + refund_tokens)
            self._put(tenant, TOKENS, _Bucket(refunded, now_ms))
        if cost_nanos:
            for period in (spent.day, spent.month):
                key = (tenant, period)
                self._spent[key] = self._spent.get(key, 0) + cost_nanos
            self._forget_old(periods)

    def _forget_old(self, periods: Periods) -> None:
        """Drops the spend of periods before the previous day and month: those are kept, so a
        wall clock stepped back over midnight (NTP, a VM resumed) finds the spent day still
        spent, not a new budget for it; the in-process memory is bounded all the same."""
        kept = {periods.day, periods.month, *periods.previous()}
        for key in [k for k in self._spent if k[1] not in kept]:
            del self._spent[key]

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Denial:
    """A request refused by its limits: the one it waits longest for, the message for the
    caller, the wait; ``exceeded``: every limit it is over, longest wait first."""

    limit: str
    message: str
    retry_after_ms: int
    exceeded: tuple[str, ...]


@dataclass
class _Settle:
    """A count for the store; ``settle_id`` makes it count once, however often it is sent
    within ``SETTLE_MARKER_MS`` of a try that may have counted it."""

    tenant: str
    policy: LimitPolicy
    refund: int
    cost_nanos: int
    settle_id: str
    at_ms: int  # when it was first sent (the limiter's ``ages``: monotonic)
    incurred_ms: int | None = None  # when its cost was incurred (the wall; None: when sent)
    # when a try that may have counted it was sent (``ages``; None: no such try, each surely
    # not sent)
    ambiguous_ms: int | None = None
    release: Hold | None = None  # the hold it releases (its request's, at its end)

    def failed(self, exc: Exception, sent_ms: int) -> None:
        """Notes a try sent at ``sent_ms`` that failed with ``exc``."""
        if not isinstance(exc, SettleNotSent) and self.ambiguous_ms is None:
            self.ambiguous_ms = sent_ms


@dataclass
class Ticket:
    """An admitted request's reservation, settled when it ends."""

    tenant: str
    policy: LimitPolicy
    reserved_tokens: int
    # its reservation replaced by what was counted (an answer, or a call billed without one)
    replaced: bool = False
    # its cost counted although its own policy sets no limit (``Policies.counts_every_spend``)
    counts_spend: bool = False
    # what it holds of its tenant's budgets until it ends (None: no budget, or no bound)
    hold: Hold | None = None
    released: bool = False
    # its counts' first tries still running: its hold's release is sent after them, so that
    # no admit sees the hold gone before the cost it stood for is counted
    counting: list[asyncio.Task[None]] = field(default_factory=list, compare=False, repr=False)
    # a count of it failed and waits in the replay queue: its release queues behind it
    queued: bool = False

    def take_release(self) -> Hold | None:
        """Its hold, to release: the first time, then None."""
        if self.hold is None or self.released:
            return None
        self.released = True
        return self.hold

    @property
    def counted(self) -> bool:
        """Whether its end is counted: it has a limit, or its spend counts all the same."""
        return self.policy.active or self.counts_spend

    def replace_reservation(self) -> int:
        """The reserved tokens to give back now: all of them the first time, then none."""
        back = 0 if self.replaced else self.reserved_tokens
        self.replaced = True
        return back


@dataclass
class ModelUse:
    """What an admitted request's pipeline told of its own model calls as it ran, for the count
    of its end (``Limiter.finish``): ``sent``, the model calls of its sent to a replica (the
    pipeline's ``model_sent``); ``refused``, those of them their replica refused before their
    start (the pipeline's ``model_refused``: nothing produced, nothing billed); ``billed``,
    its answer once billed (the pipeline's ``answer_billed``: counted even when its end is
    never read). The Gateway's call and the estimator's replay of one both count their end
    through it."""

    sent: int = 0
    refused: int = 0
    billed: pb.CompleteResponse | None = None

    def model_sent(self) -> None:
        self.sent += 1

    def model_refused(self) -> None:
        self.refused += 1

    def answer_billed(self, answer: pb.CompleteResponse) -> None:
        if self.billed is None:
            self.billed = answer


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


def used_tokens(end: pb.CompleteResponse) -> int:
    """The tokens an answer counts against the token rate: what reached a model, cache reads
    excepted; a semantic-cache hit reached none."""
    if end.served_by == pb.LAYER_SEMANTIC_CACHE:
        return 0
    return _model_tokens(end.usage)


def _model_tokens(u: pb.Usage) -> int:
    """What reached a model: input, cache writes and output (cache reads are not counted)."""
    return u.input_tokens + u.cache_creation_input_tokens + u.output_tokens


def _dollars(nanos: int) -> str:
    """Exact: cents when whole, else down to the nano-dollar ($0.00015)."""
    whole, part = divmod(nanos, NANOS_PER_DOLLAR)
    fraction = f"{part:09d}".rstrip("0").ljust(2, "0")
    return f"${whole:,}.{fraction}"


def _seconds(ms: int) -> str:
    """A wait as people read it: seconds under 2 min, minutes under 2 h, else hours."""
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def _measured(
    request: pb.CompleteRequest,
    count: Callable[[pb.CompleteRequest], int],
    bound: Callable[[pb.CompleteRequest, int], int] | None,
) -> tuple[int, int | None]:
    """``request``'s prompt tokens, and the largest bill it can make (None: no ``bound``),
    both off the event loop (a thread's)."""
    prompt = count(request)
    return prompt, None if bound is None else bound(request, prompt)


class Limiter:
    """Admits or refuses a tenant's request; settles its tokens and cost when it ends.

    A store that fails (Redis down) does not stop the Gateway: the request is admitted with
    nothing reserved (its end takes the tokens it used, gives none back), and the failure
    logged and recorded on the request's span (``cachemesh.degraded``). A settle that fails
    waits in a bounded queue and is sent again until the store answers (``replay_pending``),
    each under its own id so that the store counts it once."""

    def __init__(
        self,
        store: LimitStore,
        policies: Policies,
        clock: Clock,
        prompt_tokens: Callable[[pb.CompleteRequest], int],
        tracer: trace.Tracer | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        counted: Callable[[str, str], None] | None = None,
        lost: Callable[[int], None] | None = None,
        max_pending: int = MAX_PENDING_SETTLES,
        replay_every_s: float = SETTLE_REPLAY_S,
        breaker: Breaker | None = None,
        ages: Clock | None = None,
        cost_bound: Callable[[pb.CompleteRequest, int], int] | None = None,
        output_bound: Callable[[pb.CompleteRequest], int] | None = None,
    ) -> None:
        """``cost_bound``: the largest bill a request of so many prompt tokens can make, which
        it holds of its tenant's budgets while it runs (``Hold``; None: nothing held, and a
        budget admits every request while the spend is below it); called off the event loop
        with the count, as it may count the prompt in another row's vocabulary.
        ``output_bound``: the most output a request can write, which the token rate reserves
        with its prompt (None: its ``max_tokens``; a row thinking outside it writes more).
        ``clock``: the wall clock, for the budget periods and when a cost was incurred.
        ``ages``: what this process's own windows run on (a settle's replay window and its
        ambiguous one, the throttled log lines), which a step of the wall clock (NTP, a VM
        resumed) must neither stretch nor cut (None: a ``MonotonicClock``).
        ``prompt_tokens``: a request's prompt tokens (the router's tokenizer; the pipeline
        reuses the count, ``prompt_counts``), counted off the event loop and only under a
        token rate or, with ``cost_bound``, a budget. ``tracer``: for a settle that fails
        after its request's span ended.
        ``timeout_s``: how long a store's answer is waited for before it counts as failed (a
        Redis that hangs would otherwise hold every request for its client's socket
        timeout). ``counted``: each failure, as ``(dependency, reason)`` (the router's
        ``cachemesh_router_degraded_total``; requests admitted unlimited must show).
        ``lost``: settles dropped (``max_pending`` of them waiting already, or not sent within
        ``SETTLE_REPLAY_WINDOW_MS``), their number; ``replay_every_s``: how often the pending
        ones are tried while the store fails. ``breaker``: after admits that failed in a row,
        none is sent to the store for a while (each request admitted as when it fails, without
        the wait); None: every admit is sent. Settles are sent (and queued) as ever."""
        self._breaker = breaker
        self._cost_bound = cost_bound
        self._output_bound = output_bound
        self._counted = counted
        self._lost = lost
        self._max_pending = max_pending
        self._replay_every_s = replay_every_s
        self._pending: deque[_Settle] = deque()
        self._replaying: asyncio.Task[None] | None = None
        self._ages = ages if ages is not None else MonotonicClock()
        self._lost_log = Throttle(self._ages, LOST_LOG_INTERVAL_MS)
        self._failed_log = Throttles(self._ages, FAILED_LOG_INTERVAL_MS)
        self._store = store
        self._policies = policies
        self._clock = clock
        self._prompt_tokens = prompt_tokens
        self._tracer = tracer
        self._timeout_s = timeout_s
        self._background: set[asyncio.Task[None]] = set()
        # settles a drain gave up on (``drain``): not waited for again by the next one
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def admit(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        *,
        time_remaining_s: float | None = None,
    ) -> Ticket | Denial:
        """The request's ticket, or its denial (``time_remaining_s``: its deadline, the most
        its hold on the budgets lasts if its end is never told, ``hold_ms``). Every limit is
        checked at once by the store's ``admit``, which takes the request and its tokens
        atomically (a refusal takes neither). Under a token rate (or a budget, to hold the
        largest bill) the prompt is counted (off the event loop); a large prompt
        (``READ_FIRST_CHARS``) has the request rate and the budgets read before: a request
        over the rate or a spent budget is refused uncounted."""
        policy = await self._policies.admitting(tenant)
        if not policy.active:
            return Ticket(tenant, policy, 0, counts_spend=self._policies.counts_every_spend())
        if self._breaker is not None and self._breaker.open():
            self._left_alone()
            return Ticket(tenant, policy, 0)  # nothing reserved: as when the store fails
        prompt = reserve = 0
        bound = self._cost_bound if policy.budgeted else None  # a budget holds the largest bill
        hold: Hold | None = None
        try:
            if policy.tokens_per_min is not None or bound is not None:
                readable = policy.requests_per_min is not None or policy.budgeted
                if readable and read_first(request):
                    over = await self._ask(
                        lambda now, periods: self._store.refusal_before_count(
                            tenant, policy, now, periods
                        )
                    )
                    if over is not None:
                        return _denial(over, policy, 0, request.max_tokens)
                prompt, nanos = await asyncio.to_thread(
                    _measured, request, self._prompt_tokens, bound
                )
                if policy.tokens_per_min is not None:
                    reserve = prompt + self._most_output(request)
                if nanos is not None:
                    hold = Hold(uuid.uuid4().hex, nanos, hold_ms(time_remaining_s))
            refusal = await self._ask(
                lambda now, periods: self._store.admit(tenant, policy, reserve, now, periods, hold),
                Ticket(tenant, policy, reserve, hold=hold),
            )
        except _StoreFailed:
            # nothing known reserved, so nothing to give back: the request's end takes what it
            # used. A timeout is ambiguous (the store may have reserved after all); then the
            # reservation stays taken too, erring against the tenant, not erasing its debt. Its
            # hold, if taken, is released at its end all the same (nothing when it is not
            # there), else it lapses (HOLD_MS).
            return Ticket(tenant, policy, 0, hold=hold)
        if refusal is None:
            return Ticket(tenant, policy, reserve, hold=hold)
        return _denial(refusal, policy, prompt, request.max_tokens, self._most_output(request))

    def _most_output(self, request: pb.CompleteRequest) -> int:
        """What the token rate reserves of ``request``'s output (``output_bound``)."""
        if self._output_bound is None:
            return request.max_tokens
        return self._output_bound(request)

    async def _ask(
        self,
        call: Callable[[int, Periods], Awaitable[Refusal | None]],
        taking: Ticket | None = None,
    ) -> Refusal | None:
        """The store's verdict on an admit, at the clock's time now; ``_StoreFailed`` when it
        fails or is silent (the store's own failure, never the request's). ``taking``: what
        the call reserves when it admits; a caller that leaves (cancelled) while it is out
        leaves it to end in the background, and gives its reservation back once it admitted
        (before, a request cancelled then kept its prompt and ``max_tokens`` reserved)."""
        now = self._clock.now_ms()
        asked = asyncio.ensure_future(call(now, Periods.at(now)))
        try:
            async with asyncio.timeout(self._timeout_s):
                refusal = await asyncio.shield(asked)
        except asyncio.CancelledError:  # the caller left (the timeout's is a TimeoutError)
            if taking is None or not (taking.reserved_tokens or taking.hold):
                asked.cancel()
            else:
                self._give_back_when_admitted(asked, taking)
            raise
        except Exception as exc:
            asked.cancel()
            if self._breaker is not None:
                self._breaker.failed()
            self._degraded("admit", exc)
            raise _StoreFailed from exc
        if self._breaker is not None:
            self._breaker.answered()
        return refusal

    def _give_back_when_admitted(
        self, asked: asyncio.Future[Refusal | None], ticket: Ticket
    ) -> None:
        """Gives ``ticket``'s reservation back once the store's admit ``asked`` (its request
        gone) admitted it; in the background, within ``timeout_s`` (``drain`` awaits it). One
        that fails or does not answer in time gives nothing back: it may have reserved or not,
        as when an admit times out, and the error is against the tenant."""

        async def when_admitted() -> None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    refusal = await asked
            except Exception as exc:  # the store's failure: counted by the next request's
                log.debug("limits store: the admit of a request that left failed (%s)", exc)
                self._count(ticket, 0, 0, release=True)  # if it held after all
                return
            if refusal is None:
                self._count(ticket, ticket.replace_reservation(), 0, release=True)

        task = asyncio.create_task(when_admitted(), name="limits-admit-left")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def settle(
        self, ticket: Ticket, end: pb.CompleteResponse | None, *, release: bool = False
    ) -> None:
        """Counts what an answered request used (``end``); a request with no answer keeps its
        reservation (one that sent no model call, or whose every model call was refused
        before its start, has it back: ``unused``, by ``finish``). Runs past the request
        (``drain`` awaits it). An estimated answer's cost is not counted here: the
        billing outbox counted its estimate as it journalled its bill (``count_estimate``), so
        that a router stopped before this settle (a slow caller reading the end) leaves no
        estimate uncounted under the replay's correction."""
        if not ticket.counted or end is None:
            return
        back = ticket.replace_reservation()
        refund = back - used_tokens(end) if ticket.policy.tokens_per_min else 0
        cost = 0 if end.cost.estimated else end.cost.cost_nanos
        self._count(ticket, refund, cost, release=release)

    def finish(
        self,
        ticket: Ticket,
        end: pb.CompleteResponse | None,
        use: ModelUse,
        *,
        modelless: bool = False,
        bills: Sequence[asyncio.Future[Any]] = (),
    ) -> None:
        """Counts an admitted request's end: ``end``, its answer as read (None: none read);
        ``use``, what its pipeline told of its model calls; ``modelless``, it was served
        another call's answer, or ended while it waited on another call, with no model call of
        its own; ``bills``, the bills to come of its model calls cut without an answer (each
        tells ``charge`` its cost before it is done): the end is counted, and the hold
        released, once they are all done (failed or not), so that no admit meanwhile sees
        neither the hold nor the cost (a request cancelled mid-answer released its hold before
        its bill came: 10 admitted, 43,500,000 nanos spent on a 10,000,000 budget). One that
        used no model tokens (modelless, or ended with no answer made or
        billed before a model call of its own was sent: cancelled, out of time or refused in
        its L1 Lookup, a wait on an identical request's call, its Plan; or with every model
        call it sent refused by its replica before its start) has its reservation back whole
        (``unused``); else its answer is counted (``settle``; the billed one when its end was
        not read), or, with none, its reservation is kept (unless a cut call's bill, told by
        ``charge``, replaced it)."""
        waiting = [bill for bill in bills if not bill.done()]
        if waiting:
            after = asyncio.gather(*waiting, return_exceptions=True)
            after.add_done_callback(lambda _: self.finish(ticket, end, use, modelless=modelless))
            return
        answer = end if end is not None else use.billed
        if modelless or not (answer is not None or use.sent > use.refused):
            self.unused(ticket, release=True)
        else:
            self.settle(ticket, answer, release=True)
        self._count(ticket, 0, 0, release=True)  # its hold, when neither released it

    def unused(self, ticket: Ticket, *, release: bool = False) -> None:
        """Gives an admitted request's reservation back whole, counting no cost: it called no
        model (served another call's answer, billed to that call, or refused before its
        model call), or every model call it sent was refused by its replica before its
        start. Its place in the request rate stays taken, as an L1 hit's does."""
        if ticket.policy.active and ticket.policy.tokens_per_min:
            self._count(ticket, ticket.replace_reservation(), 0, release=release)

    def charge(self, ticket: Ticket, usage: pb.Usage, cost_nanos: int) -> None:
        """Counts a model call billed without an answer (cancelled or cut after its prefill):
        its cost against the budgets, and its tokens against the token rate in place of the
        request's reservation (the first such count replaces it; an answer that comes later,
        from another replica, adds its own tokens). In whichever order they come. A bill kept
        in the outbox comes with no cost: its estimate was counted as it was journalled
        (``count_estimate``)."""
        if not ticket.counted:
            return
        back = ticket.replace_reservation()
        refund = back - _model_tokens(usage) if ticket.policy.tokens_per_min else 0
        self._count(ticket, refund, cost_nanos)

    def count_unticketed(
        self, tenant: str, cost_nanos: int, *, started_ms: int | None = None
    ) -> None:
        """Counts the cost of a model call no request of this process admitted: an open call
        of a router killed mid-call, billed at its next start. Its tokens are counted already:
        the killed router's admission reserved the prompt and ``max_tokens``, and nothing gave
        them back. The caller counts it once: on prefix-cache's first reply to its FINAL (a
        replay that finds the FINAL made, ``repeated``, was counted by whoever had that
        reply). In the budget periods it started in (``started_ms``, this clock's; None:
        those of now): a call cut just before midnight UTC is the day's, not the next's."""
        policy = self._policies.for_tenant(tenant)
        if policy.active or self._policies.counts_every_spend():
            self._count(Ticket(tenant, policy, 0), 0, cost_nanos, started_ms)

    def count_estimate(self, tenant: str, estimate_nanos: int, counted_ms: int) -> None:
        """Counts the estimate of a bill the billing outbox journalled (an answer served, or a
        call billed without it, while prefix-cache was down) as its line is written, in the
        budget periods of ``counted_ms`` (journalled with it: where ``reconcile`` corrects it).
        Negative: an estimate counted before is taken back (its call's FINAL was made after
        all, and the entry settled unreplayed) or replaced by a larger or smaller one."""
        policy = self._policies.for_tenant(tenant)
        if policy.active or self._policies.counts_every_spend():
            self._count(Ticket(tenant, policy, 0), 0, estimate_nanos, counted_ms)

    def reconcile(
        self, tenant: str, correction_nanos: int, counted_ms: int, *, inherited: bool = False
    ) -> None:
        """Corrects a cost counted at the router's estimate (an answer served while
        prefix-cache was down) once the billing outbox's replay is billed:
        ``correction_nanos`` (billed minus estimated, either sign) goes to the budgets of the
        day and month it was counted in (``counted_ms``, this clock's), not to those of the
        replay. The caller corrects it once: on prefix-cache's first reply to its FINAL (a
        replay by a router restarted mid-replay finds it ``repeated``). ``inherited``: the
        estimate was counted by an earlier process of this router (the outbox's entry came
        from its journal); a store in this process's memory never counted it, so there is
        nothing to correct (its counts started from none at the restart)."""
        if inherited and not self._store.outlives_process:
            return
        policy = self._policies.for_tenant(tenant)
        if policy.active or self._policies.counts_every_spend():
            self._count(Ticket(tenant, policy, 0), 0, correction_nanos, counted_ms)

    def _count(
        self,
        ticket: Ticket,
        refund: int,
        cost_nanos: int,
        incurred_ms: int | None = None,
        *,
        release: bool = False,
    ) -> None:
        """Tokens back to the rate (negative: taken) and a cost to the budgets, in the
        background (``drain`` awaits it), under an id of its own; nothing when both are 0 and
        nothing is released. ``incurred_ms``: when the cost was incurred, whose budget periods
        it counts in (None: those it is sent in). ``release``: the request ended, its hold on
        the budgets (if not released yet) goes with this count, in the same settle."""
        hold = ticket.take_release() if release else None
        if refund == 0 and cost_nanos == 0 and hold is None:
            return
        now = self._ages.now_ms()
        count = _Settle(
            ticket.tenant, ticket.policy, refund, cost_nanos, uuid.uuid4().hex, now, incurred_ms
        )
        count.release = hold
        # a release goes after the counts of its request still on their way (a cut call's cost)
        earlier = [t for t in ticket.counting if not t.done()] if hold is not None else []

        async def first_try() -> None:
            if earlier:
                await asyncio.wait(earlier)
            if hold is not None and ticket.queued:
                # a cost of its request waits for a replay: sent now, the release would let
                # admits see neither the hold nor that cost until the replay (a blip between
                # them: 20 of 20 admitted, 8.7x the budget); the queue replays in order
                self._queue(count)
                return
            try:
                await self._send(count)
            except Exception as exc:
                self._degraded("settle", exc)
                # a release alone too: dropped, its hold refused the tenant until it lapsed (a
                # minute past its request's deadline); released once, however often replayed
                count.failed(exc, now)
                ticket.queued = True
                self._queue(count)

        task = asyncio.create_task(first_try(), name=f"limits-settle-{count.settle_id[:8]}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        ticket.counting[:] = [*(t for t in ticket.counting if not t.done()), task]

    async def _send(self, count: _Settle) -> None:
        now = self._clock.now_ms()
        # how long ago its cost was incurred, on this clock (the store's may differ: Redis's)
        age = 0 if count.incurred_ms is None else max(now - count.incurred_ms, 0)
        released = {} if count.release is None else {"release": count.release}
        async with asyncio.timeout(self._timeout_s):
            await self._store.settle(
                count.tenant,
                count.policy,
                count.refund,
                count.cost_nanos,
                now,
                Periods.at(now),
                settle_id=count.settle_id,
                age_ms=age,
                **released,
            )

    @property
    def pending(self) -> int:
        """Settles waiting for the store to answer again."""
        return len(self._pending)

    def _queue(self, count: _Settle) -> None:
        """Keeps a failed settle for a replay (never waits: requests go on)."""
        if len(self._pending) >= self._max_pending:
            self._drop(1, f"{self._max_pending} wait already")
            return
        self._pending.append(count)
        if self._replaying is None or self._replaying.done():
            self._replaying = asyncio.create_task(self._replay(), name="limits-settle-replay")

    async def _replay(self) -> None:
        while self._pending:
            await asyncio.sleep(self._replay_every_s)
            await self.replay_pending()

    async def replay_pending(self) -> None:
        """Sends the pending settles, oldest first, until one fails (the store is still down:
        the rest wait for the next try); drops those past the replay window, and those a try
        may have counted whose id the store may have forgotten (``AMBIGUOUS_REPLAY_MS``)."""
        while self._pending:
            count = self._pending[0]
            now = self._ages.now_ms()
            if now - count.at_ms > SETTLE_REPLAY_WINDOW_MS:
                self._pending.popleft()
                self._drop(1, "not sent within the replay window")
                continue
            if count.ambiguous_ms is not None and now - count.ambiguous_ms > AMBIGUOUS_REPLAY_MS:
                self._pending.popleft()
                self._drop(1, "a timed-out try may have counted them and its mark has lapsed")
                continue
            try:
                await self._send(count)
            except Exception as exc:
                count.failed(exc, now)
                return
            if self._pending and self._pending[0] is count:
                self._pending.popleft()

    def _drop(self, n: int, why: str, *, force: bool = False) -> None:
        """Settles lost (their cost never reaches the budgets): counted, logged once an
        interval (``force``: now)."""
        if self._lost is not None:
            self._lost(n)
        lost = self._lost_log.due(n, force=force)
        if lost:
            log.warning(
                "limits store: %d settles lost (%s); their costs and tokens are not counted "
                "against the tenants' limits",
                lost,
                why,
            )

    def _left_alone(self) -> None:
        """An admit not sent (the store failed in a row): a degradation as a timeout is (its
        metric and alert count it so), on the span with why, and no log line of its own."""
        record_event(
            self._tracer,
            "cachemesh.degraded",
            {
                "dependency": "limits",
                "error": "skipped",
                "cachemesh.skipped": "admits failed in a row (ROUTER_REDIS_BREAKER_S)",
            },
        )
        if self._counted is not None:
            self._counted("limits", "DEADLINE_EXCEEDED")

    def _degraded(self, what: str, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            exc = TimeoutError(f"no answer within {self._timeout_s} s")
        self._log_failed(what, exc)
        record_event(
            self._tracer,
            "cachemesh.degraded",
            {"dependency": "limits", "error": type(exc).__name__},
        )
        if self._counted is not None:
            timed_out = isinstance(exc, TimeoutError)
            self._counted("limits", "DEADLINE_EXCEEDED" if timed_out else "UNAVAILABLE")

    def _log_failed(self, what: str, exc: Exception) -> None:
        """The first failure of ``what`` (admit, settle) of its kind logs at once, then one line
        a ``FAILED_LOG_INTERVAL_MS`` saying how many were not logged (each one counted and on
        its span all the same); DEBUG while the breaker has left the store alone (its WARNING
        said what the requests go without meanwhile)."""
        kind = type(exc).__name__
        line = "limits store failed on %s (%s: %s); request admitted%s"
        if self._breaker is not None and self._breaker.tripped:
            log.debug(line, what, kind, exc, "")
        elif due := self._failed_log.due(what, kind):
            log.warning(line, what, kind, exc, suppressed(due, FAILED_LOG_INTERVAL_MS))

    async def drain(self) -> None:
        """Waits for the settles' first tries (not for a store that is down to come back),
        those started while it waits too. Each ends within ``timeout_s``; one still running
        ``TASKS_END_S`` after that (a store call that took its timeout's cancel and went on) is
        cancelled, and abandoned (logged, its settle counted lost) if it goes on: waiting for it
        with no bound held the router's stop forever."""
        abandoned = self._abandoned
        while pending := [t for t in self._background if not t.done() and t not in abandoned]:
            _, late = await asyncio.wait(pending, timeout=self._timeout_s + TASKS_END_S)
            if late:
                left = await cancel_within(list(late), TASKS_END_S, "limits store drain")
                abandoned.update(left)
                if left:
                    self._drop(len(left), "their first try did not end at the stop", force=True)

    async def close(self) -> None:
        await self.drain()
        if self._replaying is not None:  # bounded, as the drain is
            await cancel_within([self._replaying], TASKS_END_S, "limits store close")
        await self.replay_pending()  # a last try; what is left is lost with the process
        if self._pending:
            self._drop(len(self._pending), "the router stopped", force=True)
            self._pending.clear()
        await self._store.close()


def read_first(request: pb.CompleteRequest) -> bool:
    """Whether ``request``'s prompt is large enough to have the request rate read before it
    is counted (``READ_FIRST_CHARS``)."""
    return prompt_chars(request) >= READ_FIRST_CHARS


class _StoreFailed(Exception):
    """The store failed (or was silent) on an admit: the request is admitted unlimited."""


def _denial(
    refusal: Refusal, policy: LimitPolicy, prompt: int, max_tokens: int, output: int | None = None
) -> Denial:
    """``output``: what the request reserves of its output (None: its ``max_tokens``)."""
    message = _message(
        refusal, policy, prompt, max_tokens, max_tokens if output is None else output
    )
    return Denial(refusal.limit, message, refusal.wait_ms, (refusal.limit, *refusal.also))


_NAMES = {
    REQUESTS: "request rate",
    TOKENS: "token rate",
    DAY_BUDGET: "daily budget",
    MONTH_BUDGET: "monthly budget",
}


def _message(
    refusal: Refusal, policy: LimitPolicy, prompt: int, max_tokens: int, output: int
) -> str:
    said = _over(refusal, policy, prompt, max_tokens, output)
    if not refusal.also:
        return said
    return f"{said} (this tenant is over its {' and '.join(_NAMES[x] for x in refusal.also)} too)"


def _over(refusal: Refusal, policy: LimitPolicy, prompt: int, max_tokens: int, output: int) -> str:
    """What the limit with the longest wait says; ``output``: what the request reserves of its
    output (its ``max_tokens``, or more on a row thinking outside it)."""
    wait = _seconds(refusal.wait_ms)
    if refusal.limit == REQUESTS:
        return (
            f"rate limit: this tenant may send {policy.requests_per_min} requests a minute; "
            f"retry in {wait}"
        )
    if refusal.limit == TOKENS:
        assert policy.tokens_per_min is not None
        reserve = prompt + output
        writes = (
            f"max_tokens {max_tokens}"
            if output == max_tokens
            else f"the {output} output tokens its model can write, thinking outside max_tokens"
        )
        said = (
            f"rate limit: this tenant may use {policy.tokens_per_min} tokens a minute; this "
            f"request reserves {reserve} tokens until it ends (its prompt's {prompt} and "
            f"{writes})"
        )
        if reserve > policy.tokens_per_min:
            return (
                f"{said}, more than a minute's: it is admitted only when all "
                f"{policy.tokens_per_min} are free; retry in {wait}"
            )
        if refusal.free_tokens > 0 and not refusal.also:  # else a smaller one is refused too
            return (
                f"{said} and {refusal.free_tokens} are free now; retry in {wait}, or send a "
                f"request of at most {refusal.free_tokens} tokens (prompt and max_tokens)"
            )
        return f"{said}; retry in {wait}"
    if refusal.holding and refusal.limit in (DAY_BUDGET, MONTH_BUDGET):
        budget = (
            policy.day_budget_nanos if refusal.limit == DAY_BUDGET else policy.month_budget_nanos
        )
        assert budget is not None
        lapse = f" (the soonest in {_seconds(refusal.lapse_ms)})" if refusal.lapse_ms else ""
        return (
            f"budget: this tenant's {_NAMES[refusal.limit]} of {_dollars(budget)} is spent or "
            f"held: {refusal.holding} of its admitted requests hold "
            f"{_dollars(refusal.held_nanos)} of it (each the largest bill it can make: its "
            f"prompt and max_tokens at its model's prices) until they end, or, those of a "
            f"router stopped before it ended them, until their holds lapse{lapse}; "
            f"retry in {wait}"
        )
    if refusal.limit == DAY_BUDGET:
        assert policy.day_budget_nanos is not None
        return (
            f"budget: this tenant's daily budget of {_dollars(policy.day_budget_nanos)} is "
            f"spent; it renews at 00:00 UTC, in {wait}"
        )
    assert policy.month_budget_nanos is not None
    return (
        f"budget: this tenant's monthly budget of {_dollars(policy.month_budget_nanos)} is "
        f"spent; it renews on the 1st at 00:00 UTC, in {wait}"
    )
