"""The limits' state in this process (``MemoryLimitStore``: one router,
``ROUTER_LIMITS_REDIS_URL`` unset; the shared store is ``redis_limits``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from services.router.limit_policy import REQUESTS, TOKENS, LimitPolicy, Periods, Refusal, longest
from services.router.limit_store import (
    CLOCK_STEP_BACK_MS,
    Admission,
    Hold,
    Settlement,
    bucket_level,
    budgets_held,
    budgets_spent,
    refill_wait_ms,
    refilled_at_any_rate,
    requests_refusal,
    tokens_needed,
)

# Buckets a write of one looks at for ones to forget (``MemoryLimitStore._sweep``): more
# than the one it writes, so the map shrinks back after a burst of tenants.
SWEEP_BUCKETS = 4


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

    async def admit(self, asked: Admission) -> Refusal | None:
        tenant, policy, now_ms, periods = asked.tenant, asked.policy, asked.now_ms, asked.periods
        reserve_tokens, hold = asked.reserve_tokens, asked.hold
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

    async def settle(self, done: Settlement) -> None:
        # never fails, so never replayed: its settle ids need no memory
        tenant, now_ms, age_ms = done.tenant, done.now_ms, done.age_ms
        if done.release is not None:
            self._release(tenant, done.release)
        spent = Periods.at(now_ms - age_ms) if age_ms else done.periods  # where the cost counts
        rate = done.policy.tokens_per_min
        if rate is not None and done.refund_tokens:
            level = self._level(tenant, TOKENS, rate, now_ms)
            refunded = min(float(rate), level + done.refund_tokens)
            self._put(tenant, TOKENS, _Bucket(refunded, now_ms))
        if done.cost_nanos:
            for period in (spent.day, spent.month):
                key = (tenant, period)
                self._spent[key] = self._spent.get(key, 0) + done.cost_nanos
            self._forget_old(done.periods)

    def _forget_old(self, periods: Periods) -> None:
        """Drops the spend of periods before the previous day and month: those are kept, so a
        wall clock stepped back over midnight (NTP, a VM resumed) finds the spent day still
        spent, not a new budget for it; the in-process memory is bounded all the same."""
        kept = {periods.day, periods.month, *periods.previous()}
        for key in [k for k in self._spent if k[1] not in kept]:
            del self._spent[key]

    async def close(self) -> None:
        return None
