"""The limits' state in Redis, shared by every router of a deployment (ROUTER_LIMITS_REDIS_URL).

Per tenant, under ``<prefix>:{<tenant>}:`` (the braces keep a tenant's keys in one cluster
slot): ``requests`` and ``tokens`` hashes ``{level, at_ms}`` (a bucket as of ``at_ms``),
``spent:<day>`` and ``spent:<month>`` (nano-dollars billed in the period), ``settled:<id>`` (a
settle counted already, kept ``SETTLE_MARKER_MS``: a settle replayed after an ambiguous
failure counts once; nothing is kept longer, as a killed router's open call and an estimate's
correction are told to the limiter once, on prefix-cache's first reply to their FINAL), and
``held``, ``held:nanos``, ``held:sum`` (what the tenant's requests in flight hold of its budgets,
``limit_store.Hold``: each admitted while spend plus holds is below a budget, released by its
end's settle, lapsing after ``HOLD_MS``). Each
operation is one Lua script, so checking and taking
happen atomically with respect to every other router. The one read before it
(``refusal_before_count``: is the request rate reached or a budget spent, before the prompt is
counted for the token rate) takes nothing, so it needs no script: the time, the request
bucket and the budgets' spends, read in one ``MULTI`` (the spends of the caller's day and
month: when Redis's clock is in another, within the routers' skew of a period's end, those
of Redis's are read in a second round trip). It cannot let a request past a limit (the
admit's script checks every limit again, atomically); what it refuses, the admit would have
refused at that instant, as a request bucket only refills with time (a settle never gives
requests back) and a spent budget with its period's end.
A bucket's time, and the day and month a budget counts in (read with ``TIME`` before the
script when a budget is set), is Redis's own clock, shared by every router: routers' clocks
differ, and a bucket stamped by each router's own clock is refilled twice over by skew (a
clock behind) or frozen for everyone (a clock ahead), and around midnight UTC each router
would count in a day of its own. Tests inject the time instead
(``server_time=False``: ``now_ms`` from the caller's clock, as the in-memory store), so the
same tests drive this store and the in-memory one; Redis's key expiry only collects garbage.

The counts need a Redis that keeps them (AOF): one that loses them (restarted without
persistence, flushed) resets every tenant's budgets and rates to zero. That is seen, not
prevented (a Redis gone back in time, a lagging replica or an older snapshot, keeps the id
below and is not seen): ``<prefix>:store``, the one
key outside a tenant's (never expiring; outside its cluster slot too, as this store's client
is no cluster client), holds an id written when it is absent; each admit's script reads it
(writing a new one when it is gone). A router that finds an id it has not seen
since it started (``start``) logs an ERROR naming the Redis and counts it (``reset``), once
per loss; the counts then start from zero, and requests are admitted as ever. A router whose
Redis did not answer at start-up reads the id as ``start`` does at its first admit that
reaches Redis: an id there is no loss, and a loss after that is seen as ever.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.env import redacted_url
from services.router.limit_policy import (
    DAY_BUDGET,
    MONTH_BUDGET,
    REQUESTS,
    TOKENS,
    LimitPolicy,
    Periods,
    Refusal,
    longest,
)
from services.router.limit_store import (
    CLOCK_STEP_BACK_MS,
    HOLD_MS,
    SETTLE_MARKER_MS,
    Admission,
    Settlement,
    SettleNotSent,
    bucket_level,
    budgets_spent,
    held_refusal,
    requests_refusal,
)

log = logging.getLogger("cachemesh.router.limits")

GC_SLACK_MS = 86_400_000  # a key outlives its use by a day before Redis drops it

# The store's id (module doc): the one at KEYS[n], or ``candidate`` written there when there
# is none; and 1 when it was written.
_MARK = """
local function store_mark(key, candidate)
  local mark = redis.call('GET', key)
  if mark then return mark, 0 end
  redis.call('SET', key, candidate)
  return candidate, 1
end
"""
_START = _MARK + "return {store_mark(KEYS[1], ARGV[1])}"

# Shared by both scripts: the time (ARGV[1], or Redis's clock when it is -1); a bucket's level
# then (full when absent), refilled at cap a minute, and the time it is kept at, which does
# not go back for calls applied out of order (several routers: that refilled an interval
# twice). A clock behind the bucket's time by more than CLOCK_STEP_BACK_MS (stepped back, or
# a Redis failed over to a replica whose clock is behind) refills nothing and rebases the
# bucket to it at once, a refusal too (as the in-memory store): kept at the time ahead, an
# emptied bucket stayed empty for the whole step.
_LEVEL = (
    f"local STEP_BACK_MS = {CLOCK_STEP_BACK_MS}\n"
    + """
local function clock(given)
  if given >= 0 then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function level(key, cap, now)
  local v = redis.call('HMGET', key, 'level', 'at_ms')
  if not v[1] then return cap, now end
  local at = tonumber(v[2])
  if now < at - STEP_BACK_MS then
    redis.call('HSET', key, 'at_ms', now)
    at = now
  end
  local l = tonumber(v[1]) + math.max(0, now - at) * cap / 60000
  if l > cap then l = cap end
  return l, math.max(at, now)
end
local function keep(key, l, at, cap, slack)
  redis.call('HSET', key, 'level', tostring(l), 'at_ms', at)
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + slack)
end
"""
)

# A tenant's holds on its budgets (limit_store.Hold), each its request's largest bill while it runs:
# ``held`` (a sorted set: each hold's id, scored by when it lapses), ``held:nanos`` (a hash: id
# -> nanos) and ``held:sum`` (their sum). Lapsed holds (a killed router's) go at the next admit
# that holds, at most 100 a call; a settle that releases one takes it out of all three.
_HOLDS = """
local function holding(zset, amounts, total, now)
  local gone = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(gone) do
    redis.call('DECRBY', total, tonumber(redis.call('HGET', amounts, id) or '0'))
    redis.call('HDEL', amounts, id)
    redis.call('ZREM', zset, id)
  end
  local n = redis.call('ZCARD', zset)
  if n == 0 then
    redis.call('DEL', total, amounts)
    return 0, 0
  end
  return tonumber(redis.call('GET', total) or '0'), n
end
"""

# KEYS: requests, tokens, spent:day, spent:month, the store's id, held, held:nanos, held:sum.
# ARGV: now_ms, requests cap, tokens cap, day budget, month budget (-1 = no such limit), tokens
# to reserve, GC slack, an id for the store when it has none, the hold's id ('' = none: the
# budgets are checked against the spend alone), its nanos, its life in ms. Returns the store's
# id, then nothing (admitted) or, for every limit the request is over (each is checked),
# {limit index, wait ms, free tokens}: 1 day budget, 2 month budget, 3 requests, 4 tokens (a
# budget's wait is computed by the caller; -1: not spent, but held by requests in flight,
# whose nanos and number follow as {5, held nanos, holds}, then {6, ms until the soonest of
# their holds lapses, 0}). The token bucket must hold the
# reservation, or be full when the reservation is larger (limits.tokens_needed).
_ADMIT = (
    _LEVEL
    + _MARK
    + _HOLDS
    + """
local over = {(store_mark(KEYS[5], ARGV[8]))}
local now = clock(tonumber(ARGV[1]))
local rcap, tcap = tonumber(ARGV[2]), tonumber(ARGV[3])
local day, month = tonumber(ARGV[4]), tonumber(ARGV[5])
local reserve, slack = tonumber(ARGV[6]), tonumber(ARGV[7])
local hold_id, hold_nanos, hold_ms = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
local function refuse(limit, wait, free)
  over[#over + 1] = limit
  over[#over + 1] = wait
  over[#over + 1] = free
end
local held, holds = 0, 0
if hold_id ~= '' then held, holds = holding(KEYS[6], KEYS[7], KEYS[8], now) end
local by_holds = false
local function budget(limit, cap, key)
  if cap < 0 then return end
  local spent = tonumber(redis.call('GET', key) or '0')
  if spent >= cap then
    refuse(limit, 0, 0)
  elseif spent + held >= cap then
    refuse(limit, -1, 0)
    by_holds = true
  end
end
budget(1, day, KEYS[3])
budget(2, month, KEYS[4])
local r, t, rat, tat = 0, 0, now, now
if rcap > 0 then
  r, rat = level(KEYS[1], rcap, now)
  if r < 1 then refuse(3, math.max(1, math.ceil((1 - r) * 60000 / rcap)), 0) end
end
if tcap > 0 then
  t, tat = level(KEYS[2], tcap, now)
  local need = math.max(1, math.min(reserve, tcap))
  if t < need then
    refuse(4, math.max(1, math.ceil((need - t) * 60000 / tcap)), math.max(0, math.floor(t)))
  end
end
if by_holds then
  refuse(5, held, holds)
  local soonest = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
  refuse(6, math.max(0, tonumber(soonest[2] or now) - now), 0)
end
if #over > 1 then return over end
if rcap > 0 then keep(KEYS[1], r - 1, rat, rcap, slack) end
if tcap > 0 then keep(KEYS[2], t - reserve, tat, tcap, slack) end
if hold_id ~= '' and hold_nanos > 0 then
  redis.call('ZADD', KEYS[6], now + hold_ms, hold_id)
  redis.call('HSET', KEYS[7], hold_id, hold_nanos)
  redis.call('INCRBY', KEYS[8], hold_nanos)
  for i = 6, 8 do redis.call('PEXPIRE', KEYS[i], hold_ms + slack) end
end
return over
"""
)

# KEYS: tokens, spent:day, spent:month, the settle's marker (unused when it has no id), held,
# held:nanos, held:sum. ARGV: now_ms, tokens cap (0 = none), tokens to give back, cost nanos, ms
# until the day's end, ms until the month's end, GC slack, the marker's life in ms (0 = no
# marker), the id of the hold it releases ('' = none). A settle whose marker is there already
# was counted (a replay after an ambiguous timeout): nothing again.
_SETTLE = (
    _LEVEL
    + """
if tonumber(ARGV[8]) > 0 and not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[8]) then
  return 0
end
if ARGV[9] ~= '' and redis.call('ZREM', KEYS[5], ARGV[9]) == 1 then
  local nanos = tonumber(redis.call('HGET', KEYS[6], ARGV[9]) or '0')
  redis.call('HDEL', KEYS[6], ARGV[9])
  if redis.call('ZCARD', KEYS[5]) == 0 then
    redis.call('DEL', KEYS[7], KEYS[6])
  else
    redis.call('DECRBY', KEYS[7], nanos)
  end
end
local now, tcap, refund = clock(tonumber(ARGV[1])), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, slack = tonumber(ARGV[4]), tonumber(ARGV[7])
if tcap > 0 and refund ~= 0 then
  local t, at = level(KEYS[1], tcap, now)
  keep(KEYS[1], math.min(tcap, t + refund), at, tcap, slack)
end
if cost ~= 0 then
  redis.call('INCRBY', KEYS[2], cost)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]) + slack)
  redis.call('INCRBY', KEYS[3], cost)
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]) + slack)
end
return 0
"""
)

_LIMITS = (DAY_BUDGET, MONTH_BUDGET, REQUESTS, TOKENS)
HELD_INFO = 5  # the admit's {5, held nanos, holds} and {6, lapse ms, 0} after the refusals


def _bytes(value: bytes | str) -> bytes:
    """A script's string reply, whether the client decodes replies or not."""
    return value.encode() if isinstance(value, str) else value


def _or_none(value: int | None) -> int:
    return -1 if value is None else value


def _cap(value: int | None) -> int:
    """A bucket's capacity for the script: 0 = no such limit (a rate is at least 1)."""
    return 0 if value is None else value


class RedisLimitStore:
    outlives_process = True  # every router's, across their restarts

    def __init__(
        self,
        client: Redis,
        prefix: str = "cachemesh:limits",
        *,
        server_time: bool = True,
        url: str | None = None,
        reset: Callable[[], None] | None = None,
    ) -> None:
        """``server_time``: the buckets' time is Redis's clock (every router's); False: the
        caller's ``now_ms`` (tests, with an injected clock). ``url``: the client's, named
        (without its password) when the store is found to have lost its counts; ``reset``:
        told of each such loss (module doc)."""
        self._client = client
        self._prefix = prefix
        self._server_time = server_time
        self._where = "its Redis" if url is None else redacted_url(url)
        self._reset = reset
        self._marker = f"{prefix}:store"
        self._marks: set[bytes] = set()  # the store's ids seen since ``start``
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._start = client.register_script(_START)

    async def start(self) -> None:
        """Reads the store's id, writing one when there is none: a new store, or one that
        lost its counts while no router ran (not told apart). Not done (Redis did not
        answer): the first admit does it."""
        mark, written = cast(
            list[Any], await self._start(keys=[self._marker], args=[uuid.uuid4().hex])
        )
        self._marks.add(_bytes(mark))
        if written:
            log.info("limits store at %s holds no counts yet: they start from zero", self._where)

    def _seen(self, mark: bytes) -> None:
        """An admit found the store's id ``mark``: one not seen since ``start`` means the
        counts were lost (the id gone; written again by this admit, or by another router)."""
        if mark in self._marks:
            return
        if self._marks:
            log.error(
                "limits store at %s lost its counts (its key %s was gone: Redis restarted "
                "without persistence, was flushed or evicted it): every tenant's rates and "
                "budgets count from zero; give that Redis persistence (appendonly yes) and "
                "maxmemory-policy noeviction",
                self._where,
                self._marker,
            )
            if self._reset is not None:
                self._reset()
        self._marks.add(mark)

    def _key(self, tenant: str, name: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:{name}"

    async def _clock(self, spends: bool, now_ms: int, periods: Periods) -> tuple[int, Periods, int]:
        """The time and budget periods to count in, and the time for the script (-1: it
        reads Redis's). Redis's when it keeps the time and the call counts spend against a
        budget (routers whose clocks differ around midnight UTC must count in the same day;
        the script then gets the time read here, one reading for both), else the caller's."""
        if not self._server_time:
            return now_ms, periods, now_ms
        if not spends:
            return now_ms, periods, -1
        seconds, micros = await self._client.time()
        server_ms = int(seconds) * 1000 + int(micros) // 1000
        return server_ms, Periods.at(server_ms), server_ms

    async def admit(self, asked: Admission) -> Refusal | None:
        tenant, policy, hold = asked.tenant, asked.policy, asked.hold
        if not self._marks:  # not started: Redis did not answer at start-up (module doc)
            await self.start()
        now_ms, periods, script_ms = await self._clock(policy.budgeted, asked.now_ms, asked.periods)
        keys = [
            self._key(tenant, REQUESTS),
            self._key(tenant, TOKENS),
            *self._spent_keys(tenant, periods),
            self._marker,
            *self._hold_keys(tenant),
        ]
        args: list[int | str] = [
            script_ms,
            _cap(policy.requests_per_min),
            _cap(policy.tokens_per_min),
            _or_none(policy.day_budget_nanos),
            _or_none(policy.month_budget_nanos),
            asked.reserve_tokens,
            GC_SLACK_MS,
            uuid.uuid4().hex,
            "" if hold is None else hold.id,
            0 if hold is None else hold.nanos,
            HOLD_MS if hold is None else hold.ms,
        ]
        mark, *over_limits = cast(list[Any], await self._admit(keys=keys, args=args))
        self._seen(_bytes(mark))
        found = [int(v) for v in over_limits]
        if not found:
            return None
        over: list[Refusal] = []
        held = holds = lapse = 0
        if len(found) >= 6 and found[-6] == HELD_INFO:  # the holds (their refusals: -1)
            held, holds, lapse = found[-5], found[-4], found[-2]
            found = found[:-6]
        for i in range(0, len(found), 3):
            limit, wait, free = _LIMITS[found[i] - 1], found[i + 1], found[i + 2]
            if wait < 0:
                over.append(held_refusal(limit, held, holds, lapse))
                continue
            if limit == DAY_BUDGET:
                wait = periods.day_end_ms - now_ms
            elif limit == MONTH_BUDGET:
                wait = periods.month_end_ms - now_ms
            over.append(Refusal(limit, wait, free))
        return longest(over)

    async def refusal_before_count(
        self, tenant: str, policy: LimitPolicy, now_ms: int, periods: Periods
    ) -> Refusal | None:
        cap = policy.requests_per_min
        if cap is None and not policy.budgeted:
            return None
        async with self._client.pipeline() as read:  # MULTI: the time and the counts at once
            if self._server_time:
                read.time()
            if cap is not None:
                read.hmget(self._key(tenant, REQUESTS), "level", "at_ms")
            if policy.budgeted:  # the caller's periods: Redis's too, but near a period's end
                read.mget(self._spent_keys(tenant, periods))
            replies = list(await read.execute())
        read_in = periods
        if self._server_time:
            seconds, micros = replies.pop(0)
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            periods = Periods.at(now_ms)
        over: list[Refusal] = []
        if policy.budgeted:
            spent = replies.pop()
            if (read_in.day, read_in.month) != (periods.day, periods.month):
                # the caller's clock and Redis's in different periods (within their skew of a
                # day's end): the budgets of Redis's, which the admit counts in, read again
                spent = await self._client.mget(self._spent_keys(tenant, periods))
            day, month = (0 if v is None else int(v) for v in spent)
            over = budgets_spent(policy, day, month, now_ms, periods)
        if cap is not None:
            level, at_ms = replies.pop()
            # as the admit's script reads it: full when absent; no refill for a time ahead
            requests = (
                float(cap)
                if level is None
                else bucket_level(float(level), int(float(at_ms)), cap, now_ms)
            )
            if requests < 1:
                over.append(requests_refusal(requests, cap))
        return longest(over) if over else None

    def _hold_keys(self, tenant: str) -> list[str]:
        """The keys of ``tenant``'s holds on its budgets (``_HOLDS``)."""
        return [
            self._key(tenant, "held"),
            self._key(tenant, "held:nanos"),
            self._key(tenant, "held:sum"),
        ]

    def _spent_keys(self, tenant: str, periods: Periods) -> list[str]:
        """The keys of what ``tenant`` spent in the day and the month of ``periods``."""
        return [
            self._key(tenant, f"spent:{periods.day}"),
            self._key(tenant, f"spent:{periods.month}"),
        ]

    async def settle(self, done: Settlement) -> None:
        await self._connected()
        tenant, age_ms, settle_id = done.tenant, done.age_ms, done.settle_id
        now_ms, periods, script_ms = await self._clock(
            done.cost_nanos != 0, done.now_ms, done.periods
        )
        # the periods the cost was incurred in: that long before the time counted in (Redis's)
        spent = Periods.at(now_ms - age_ms) if age_ms else periods
        keys = [
            self._key(tenant, TOKENS),
            self._key(tenant, f"spent:{spent.day}"),
            self._key(tenant, f"spent:{spent.month}"),
            self._key(tenant, f"settled:{settle_id or '-'}"),  # used with an id only
            *self._hold_keys(tenant),
        ]
        args: list[int | str] = [
            script_ms,
            _cap(done.policy.tokens_per_min),
            done.refund_tokens,
            done.cost_nanos,
            max(spent.day_end_ms - now_ms, 0),  # a period over: kept GC_SLACK_MS still
            max(spent.month_end_ms - now_ms, 0),
            GC_SLACK_MS,
            0 if settle_id is None else SETTLE_MARKER_MS,  # the marker's life (0: none)
            "" if done.release is None else done.release.id,
        ]
        try:
            await self._settle(keys=keys, args=args)
        except (ResponseError, BusyLoadingError) as exc:
            # An error reply (OOM under noeviction, READONLY after a failover, NOPERM) is
            # Redis's answer, not silence: the script ran none of its writes. Redis refuses a
            # script for OOM only before its first write (never midway), READONLY and NOPERM
            # at the command they hit, and the script's first write is the marker's SET NX:
            # refused there, it wrote nothing (the tests see no key). An error past the marker
            # (a key of another type) leaves the marker, so the replay a second later counts
            # nothing. Either way it is replayed as one never sent, for the whole window. A
            # Redis still loading its data after a restart (LOADING, which redis-py raises as a
            # connection error) refuses the whole script the same way.
            raise SettleNotSent(f"Redis refused it ({exc})") from exc

    async def _connected(self) -> None:
        """``SettleNotSent`` when no connection to Redis can be made (refused, unreachable):
        nothing was sent, so the settle may be replayed past its marker's life. A failure
        after this (a timeout, a connection lost mid-call) is ambiguous."""
        pool = self._client.connection_pool
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise SettleNotSent(f"no connection to Redis ({exc})") from exc
        await pool.release(connection)

    async def close(self) -> None:
        await self._client.aclose()
