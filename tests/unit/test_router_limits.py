"""The Gateway's limits (services.router.limits) on both stores: every test using ``store`` runs
in memory and against a real Redis (tests/unit/conftest.py), with an injected clock. The
expected waits are worked by hand from the rates (a bucket refills at its capacity a minute)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError

from cachemesh.admin_cli import budget_change
from cachemesh.retry_info import retry_delay_s, status_details
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.errors import Code
from services.common.models import load_model_table
from services.common.prompt import prompt_tokens
from services.common.retry_info import retry_trailers
from services.common.tokens import load_cl100k, load_tokenizers
from services.router import memory_limits
from services.router.limit_denials import Denial
from services.router.limit_policy import (
    DAY_BUDGET,
    MONTH_BUDGET,
    REQUESTS,
    TOKENS,
    LimitPolicy,
    Periods,
    Refusal,
    UniformPolicies,
)
from services.router.limit_policy import NANOS_PER_DOLLAR as NANOS
from services.router.limit_settings import LimitSettings
from services.router.limit_store import (
    AMBIGUOUS_REPLAY_MS,
    CLOCK_STEP_BACK_MS,
    SETTLE_MARKER_MS,
    SETTLE_REPLAY_WINDOW_MS,
    Admission,
    LimitStore,
    Settlement,
    SettleNotSent,
)
from services.router.limit_tickets import Ticket
from services.router.limit_wiring import build_limiter
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.redis_limits import RedisLimitStore
from services.tools.stack.ports import free_port
from tests.black_hole import BlackHole
from tests.redis_server import client_of, redis_server, require_password
from tests.unit.gateway_support import PATIENT_STORE_S, patient_limit_settings

# 2023-11-14 22:13:20 UTC: 1 h 46 min 40 s (6,400,000 ms) before the day ends, 16 days more
# before the month does.
START_MS = 1_700_000_000_000
TO_MIDNIGHT_MS = 6_400_000
TO_MONTH_END_MS = 16 * 86_400_000 + TO_MIDNIGHT_MS
TOKENIZER = load_cl100k()
TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())


def _count(request: pb.CompleteRequest) -> int:
    return prompt_tokens(request, TOKENIZER)


HI = 4  # the tokens of _request's prompt ("\n\nuser: hi"): a request reserves them too


@pytest.fixture
def store(redis_client: Redis | None) -> LimitStore:
    if redis_client is None:
        return MemoryLimitStore()
    return RedisLimitStore(redis_client, server_time=False)  # the tests' clock, injected


def _request(max_tokens: int = 100) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="hi")])],
        max_tokens=max_tokens,
    )


def _answer(
    input_tokens: int,
    output_tokens: int,
    cost_nanos: int,
    layer: pb.Layer.ValueType = pb.LAYER_MODEL,
) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        served_by=layer,
        usage=pb.Usage(
            input_tokens=input_tokens,
            cache_read_input_tokens=5000,  # never counted
            output_tokens=output_tokens,
        ),
        cost=pb.Cost(cost_nanos=cost_nanos),
    )


def _limiter(store: LimitStore, policy: LimitPolicy, clock: ManualClock) -> Limiter:
    return Limiter(store, UniformPolicies(policy), clock, _count, timeout_s=PATIENT_STORE_S)


def _long_request(words: int, max_tokens: int) -> pb.CompleteRequest:
    text = "Summarise: " + " ".join(f"w{j}" for j in range(words))
    return pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
    )


async def _admitted(limiter: Limiter, tenant: str = "t", reserve: int = 100) -> Ticket:
    """Admits a request reserving ``reserve`` tokens (its prompt's HI and its max_tokens)."""
    ticket = await limiter.admit(tenant, _request(reserve - HI))
    assert isinstance(ticket, Ticket), ticket
    return ticket


async def _denied(limiter: Limiter, tenant: str = "t", reserve: int = 100) -> Denial:
    denial = await limiter.admit(tenant, _request(reserve - HI))
    assert isinstance(denial, Denial), denial
    return denial


async def test_request_rate_refuses_the_fourth_of_three_a_minute_until_one_refills(
    store: LimitStore,
) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(requests_per_min=3), clock)
    for _ in range(3):
        await _admitted(limiter)
    denial = await _denied(limiter)
    assert denial.limit == REQUESTS
    assert denial.retry_after_ms == 20_000  # one request every 20 s
    assert "3 requests a minute" in denial.message
    await _admitted(limiter, tenant="other")  # each tenant has its own count
    clock.advance(ms=19_999)
    assert (await _denied(limiter)).retry_after_ms == 1
    clock.advance(ms=1)
    await _admitted(limiter)
    await _denied(limiter)


async def test_token_rate_reserves_prompt_and_max_tokens_and_settles_what_was_used(
    store: LimitStore,
) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(tokens_per_min=1000), clock)
    assert _count(_request()) == HI
    first = await _admitted(limiter, reserve=600)  # 1000 -> 400
    denial = await _denied(limiter, reserve=600)  # admitted only while the bucket holds it
    assert denial.limit == TOKENS
    assert denial.retry_after_ms == 12_000  # 200 tokens at 1000 a minute
    await _admitted(limiter, reserve=400)  # 400 -> 0
    # the first used 100 in + 50 out (cache reads not counted): 450 of its 600 come back
    limiter.settle(first, _answer(100, 50, cost_nanos=0))
    await limiter.drain()
    await _denied(limiter, reserve=451)
    # a semantic-cache hit reached no model: its whole reservation comes back
    hit = await _admitted(limiter, reserve=450)  # 450 -> 0
    await _denied(limiter, reserve=HI + 1)
    limiter.settle(hit, _answer(100, 50, cost_nanos=0, layer=pb.LAYER_SEMANTIC_CACHE))
    await limiter.drain()
    await _admitted(limiter, reserve=450)


async def test_token_rate_reserves_the_prompt_too_and_admits_what_the_bucket_holds(
    store: LimitStore,
) -> None:
    """20 requests at once, each a 607-token prompt and max_tokens=4, against 2,000 tokens a
    minute. Reserving only max_tokens while the bucket held >= 1 admitted all 20 (12,220
    tokens once settled, 6x the limit, then the tenant locked out for 5 min): the prompt is
    reserved too, and a request is admitted only while the bucket holds its reservation."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(tokens_per_min=2000), clock)
    request = _long_request(300, max_tokens=4)
    reserve = prompt_tokens(request, TOKENIZER) + 4
    assert reserve == 611
    verdicts = await asyncio.gather(*(limiter.admit("t", request) for _ in range(20)))
    admitted = [v for v in verdicts if isinstance(v, Ticket)]
    assert len(admitted) == 3  # 2000 -> 2000 - 3 * reserve, less than one more reservation
    assert all(t.reserved_tokens == reserve for t in admitted)
    denial = next(v for v in verdicts if isinstance(v, Denial))
    left = 2000 - 3 * reserve
    assert denial.limit == TOKENS
    assert denial.retry_after_ms == math.ceil((reserve - left) * 60_000 / 2000)
    assert f"this request reserves {reserve} tokens" in denial.message
    assert f"{left} are free now" in denial.message
    # a small request fits in what is left, now
    await _admitted(limiter, reserve=left)


async def test_a_request_larger_than_the_token_rate_waits_for_a_full_bucket(
    store: LimitStore,
) -> None:
    """A reservation above the bucket's capacity is admitted when the bucket is full (else it
    could never pass), and takes the bucket below zero."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(tokens_per_min=100), clock)
    big = _long_request(300, max_tokens=4)
    reserve = prompt_tokens(big, TOKENIZER) + 4
    assert isinstance(await limiter.admit("t", big), Ticket)  # 100 -> 100 - reserve
    denial = await limiter.admit("t", big)
    assert isinstance(denial, Denial)
    assert denial.retry_after_ms == reserve * 600  # back to 100, at 100 a minute
    assert "are free now" not in denial.message  # the bucket is below zero: only waiting helps
    clock.advance(ms=denial.retry_after_ms - 1)
    assert isinstance(await limiter.admit("t", big), Denial)
    clock.advance(ms=1)
    assert isinstance(await limiter.admit("t", big), Ticket)


async def test_a_request_without_an_answer_keeps_its_reservation(store: LimitStore) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(tokens_per_min=100), clock)
    ticket = await _admitted(limiter, reserve=100)
    limiter.settle(ticket, None)  # failed or cut: counted as its prompt and max_tokens
    await limiter.drain()
    assert (await _denied(limiter, reserve=HI + 1)).retry_after_ms == 3_000  # 5 at 100 a min


async def test_a_call_billed_without_its_answer_counts_its_cost_and_tokens(
    store: LimitStore,
) -> None:
    """A stream the caller left after the prefill is billed (the prompt, the output so far):
    that cost counts against the budget and those tokens against the rate."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(tokens_per_min=1000, day_budget_nanos=1000)
    limiter = _limiter(store, policy, clock)
    ticket = await _admitted(limiter, reserve=HI + 1)  # 1000 -> 995
    limiter.charge(ticket, pb.Usage(input_tokens=950, output_tokens=50), 1000)  # 995 + 5 - 1000
    limiter.settle(ticket, None)  # no answer
    await limiter.drain()
    assert (await _denied(limiter)).limit == DAY_BUDGET  # 1000 of 1000 spent
    tokens_only = _limiter(store, LimitPolicy(tokens_per_min=1000), clock)
    assert (await _denied(tokens_only)).limit == TOKENS  # empty


async def test_a_cancelled_call_counts_its_billed_tokens_not_its_reservation_too(
    store: LimitStore,
) -> None:
    """A stream the caller stopped is counted at what it was billed, not at its max_tokens on
    top of that (a chat client's stop button must not throttle its tenant twice over)."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(tokens_per_min=1000), clock)
    ticket = await _admitted(limiter, reserve=900)  # 1000 -> 100
    limiter.settle(ticket, None)  # cancelled: the reservation stays until the bill comes
    limiter.charge(ticket, pb.Usage(input_tokens=100, output_tokens=50), 0)
    await limiter.drain()
    await _admitted(limiter, reserve=850)  # 1000 - 150 = 850 left (both: 850 - 900, refused)
    assert (await _denied(limiter, reserve=HI + 1)).limit == TOKENS


@pytest.mark.parametrize("answer_first", [False, True])
async def test_a_call_cut_then_answered_elsewhere_counts_both_calls_once(
    store: LimitStore, answer_first: bool
) -> None:
    """Cut on one replica after its prefill (billed), answered by another: both calls count,
    the reservation is given back once, whichever is counted first."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(tokens_per_min=1000), clock)
    ticket = await _admitted(limiter, reserve=900)  # 1000 -> 100
    cut = pb.Usage(input_tokens=100, output_tokens=50)
    answered = _answer(100, 50, cost_nanos=0)
    if answer_first:
        limiter.settle(ticket, answered)
        limiter.charge(ticket, cut, 0)
    else:
        limiter.charge(ticket, cut, 0)
        limiter.settle(ticket, answered)
    await limiter.drain()
    await _admitted(limiter, reserve=700)  # 1000 - 150 - 150 = 700 left
    assert (await _denied(limiter, reserve=HI + 1)).limit == TOKENS


async def test_daily_budget_refuses_until_midnight_utc_then_renews(store: LimitStore) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(day_budget_nanos=1000), clock)
    limiter.settle(await _admitted(limiter), _answer(10, 10, cost_nanos=600))
    await limiter.drain()
    # 600 < 1000: admitted, and this one takes the bill past the budget
    limiter.settle(await _admitted(limiter), _answer(10, 10, cost_nanos=600))
    await limiter.drain()
    denial = await _denied(limiter)
    assert denial.limit == DAY_BUDGET
    assert denial.retry_after_ms == TO_MIDNIGHT_MS
    assert "daily budget of $0.000001 is spent" in denial.message
    await _admitted(limiter, tenant="other")
    clock.advance(ms=TO_MIDNIGHT_MS)
    await _admitted(limiter)


async def test_monthly_budget_refuses_until_the_first_of_the_next_month(
    store: LimitStore,
) -> None:
    clock = ManualClock(START_MS)
    policy = LimitPolicy(day_budget_nanos=5_000, month_budget_nanos=1_000)
    limiter = _limiter(store, policy, clock)
    limiter.settle(await _admitted(limiter), _answer(10, 10, cost_nanos=1_000))
    await limiter.drain()
    denial = await _denied(limiter)
    assert denial.limit == MONTH_BUDGET
    assert denial.retry_after_ms == TO_MONTH_END_MS
    clock.advance(ms=TO_MIDNIGHT_MS)  # a new day, the same month
    assert (await _denied(limiter)).limit == MONTH_BUDGET
    clock.advance(ms=TO_MONTH_END_MS - TO_MIDNIGHT_MS)
    await _admitted(limiter)


async def test_a_refusal_waits_for_the_longest_of_the_limits_it_is_over(
    store: LimitStore,
) -> None:
    """Day and month budgets both spent: the refusal named the day's end (the first limit
    checked), and a client that waited as told was refused again until the month's end. Every
    limit is checked: the wait is the longest, naming that limit, the others listed too."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(
        requests_per_min=2, tokens_per_min=600, day_budget_nanos=1000, month_budget_nanos=3000
    )
    limiter = _limiter(store, policy, clock)
    # over the request rate (30 s for one) and the token rate (600 a minute: 50 s to hold 500)
    await _admitted(limiter, reserve=300)
    await _admitted(limiter, reserve=300)  # 600 -> 0 tokens, 2 -> 0 requests
    denial = await _denied(limiter, reserve=500)
    assert (denial.limit, denial.retry_after_ms) == (TOKENS, 50_000)
    assert denial.exceeded == (TOKENS, REQUESTS)
    assert "tokens a minute" in denial.message and "request rate" in denial.message
    assert "are free now" not in denial.message  # a smaller request would meet the rate
    # the day's and the month's budgets spent too: the month's end, the longest
    limiter.settle(await _admitted(limiter, "u"), _answer(1, 1, cost_nanos=3000))
    await limiter.drain()
    denial = await _denied(limiter, "u")
    assert (denial.limit, denial.retry_after_ms) == (MONTH_BUDGET, TO_MONTH_END_MS)
    assert denial.exceeded == (MONTH_BUDGET, DAY_BUDGET)
    assert "monthly budget" in denial.message and "daily budget" in denial.message
    clock.advance(ms=TO_MIDNIGHT_MS)  # waiting only for the day's end would not do
    assert (await _denied(limiter, "u")).limit == MONTH_BUDGET
    clock.advance(ms=TO_MONTH_END_MS - TO_MIDNIGHT_MS)
    await _admitted(limiter, "u")


def test_the_quota_failure_names_every_limit_exceeded_longest_wait_first() -> None:
    trailers = retry_trailers(
        Code.RESOURCE_EXHAUSTED, "spent", 1_500, "tenant:t", (MONTH_BUDGET, DAY_BUDGET)
    )
    status = status_details(trailers)
    assert status is not None
    quota = error_details_pb2.QuotaFailure()
    assert status.details[1].Unpack(quota)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("tenant:t", MONTH_BUDGET),
        ("tenant:t", DAY_BUDGET),
    ]


async def test_a_zero_budget_refuses_the_first_request(store: LimitStore) -> None:
    limiter = _limiter(store, LimitPolicy(day_budget_nanos=0), ManualClock(START_MS))
    assert (await _denied(limiter)).limit == DAY_BUDGET


async def test_a_killed_routers_call_billed_at_the_next_start_counts_its_cost(
    store: LimitStore,
) -> None:
    """An open call of a router killed mid-call is billed by the next start's outbox, with no
    request of that process to settle it: before, its cost counted against no budget. Its
    tokens are not counted again (the killed router's admission reserved them)."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(day_budget_nanos=2_000, tokens_per_min=1_000), clock)
    await _admitted(limiter, reserve=100)  # the killed router's: its reservation stays taken
    limiter.count_unticketed("t", 1_000)
    await limiter.drain()
    await _admitted(limiter, reserve=900)  # its tokens were not taken a second time
    limiter.count_unticketed("t", 1_000)
    await limiter.drain()
    assert (await _denied(limiter, reserve=HI)).limit == DAY_BUDGET


async def test_a_killed_routers_call_counts_in_the_day_it_started(store: LimitStore) -> None:
    """A call cut by a kill a minute before midnight UTC, billed at the start five minutes
    after: it counted against the new day's budget (a $0.000001 call refused the tenant all
    of that day under a $0.000001 budget), when it was made the day before. It counts in the
    day it started now, and in its month still."""
    midnight = Periods.at(START_MS).day_end_ms  # mid-month
    clock = ManualClock(midnight + 300_000)
    policy = LimitPolicy(day_budget_nanos=1_000, month_budget_nanos=1_500)
    limiter = _limiter(store, policy, clock)
    limiter.count_unticketed("t", 1_000, started_ms=midnight - 60_000)
    await limiter.drain()
    await _admitted(limiter)  # the new day's budget untouched
    limiter.count_unticketed("t", 600, started_ms=midnight + 60_000)
    await limiter.drain()
    denial = await _denied(limiter)  # 1,600 in the month; 600 in the day, under its budget
    assert (denial.limit, denial.exceeded) == (MONTH_BUDGET, (MONTH_BUDGET,))


async def test_a_killed_routers_call_counts_in_the_month_it_started(store: LimitStore) -> None:
    """The same across the month's end: a call cut the minute before counts in the month
    (and the day) it was made, not against the new month's budget."""
    month_end = Periods.at(START_MS).month_end_ms
    clock = ManualClock(month_end + 300_000)
    policy = LimitPolicy(day_budget_nanos=1_000, month_budget_nanos=1_000)
    limiter = _limiter(store, policy, clock)
    limiter.count_unticketed("t", 1_000, started_ms=month_end - 60_000)
    await limiter.drain()
    await _admitted(limiter)
    limiter.count_unticketed("t", 1_000, started_ms=month_end + 60_000)
    await limiter.drain()
    assert set((await _denied(limiter)).exceeded) == {DAY_BUDGET, MONTH_BUDGET}


async def test_a_killed_routers_call_counts_in_redis_day_it_started(redis_url: str) -> None:
    """Redis keeping the time (as deployed): a call's periods are Redis's clock that long
    ago (the router's clock only measures how long ago it started, between its journal
    line and its count), so routers whose clocks differ agree on the day it counts in."""
    client = client_of(redis_url)
    try:
        await client.flushdb()
        seconds, micros = await client.time()
        redis_now = Periods.at(int(seconds) * 1000 + int(micros) // 1000)
        today = redis_now.day_end_ms - 86_400_000
        yesterday = Periods.at(today - 3_600_000).day
        clock = ManualClock(START_MS)  # the router's: far off Redis's
        limiter = _limiter(RedisLimitStore(client), LimitPolicy(day_budget_nanos=1_000), clock)
        # it started an hour before Redis's midnight: its age then, on the router's clock
        age_ms = (int(seconds) * 1000 + int(micros) // 1000) - (today - 3_600_000)
        limiter.count_unticketed("t", 700, started_ms=START_MS - age_ms)
        await limiter.drain()
        assert int(await _spent(client, yesterday)) == 700
        assert await _spent(client, redis_now.day) is None
    finally:
        await client.aclose()


async def test_two_limiters_on_one_store_share_the_counts(store: LimitStore) -> None:
    """Two routers on one Redis (or one process's store) count one tenant's requests once."""
    clock = ManualClock(START_MS)
    one = _limiter(store, LimitPolicy(requests_per_min=2), clock)
    two = _limiter(store, LimitPolicy(requests_per_min=2), clock)
    await _admitted(one)
    await _admitted(two)
    assert (await _denied(one)).limit == REQUESTS
    assert (await _denied(two)).limit == REQUESTS


async def test_a_clock_stepped_back_neither_freezes_nor_refills_an_emptied_bucket(
    store: LimitStore,
) -> None:
    """The clock steps back an hour (NTP, a VM resumed; on Redis, a failover to a replica
    whose clock is behind) while a tenant's buckets are empty. Refilled only from the stamp
    ahead of the clock, they stayed empty for the whole hour while every refusal said "retry
    in 20 s". Now a bucket ahead of the clock is rebased to it: the step refills nothing, and
    the refusal's wait holds."""
    clock = ManualClock(START_MS)
    requests = _limiter(store, LimitPolicy(requests_per_min=3), clock)
    tokens = _limiter(store, LimitPolicy(tokens_per_min=1000), clock)
    for _ in range(3):
        await _admitted(requests, tenant="r")
    for _ in range(10):
        await _admitted(tokens, tenant="t", reserve=100)
    clock.advance(ms=-3_600_000)
    for limiter, tenant, wait in ((tokens, "t", 6_000), (requests, "r", 20_000)):
        denial = await _denied(limiter, tenant)  # the step refilled nothing
        assert denial.retry_after_ms == wait
        clock.advance(ms=wait - 1)
        await _denied(limiter, tenant)  # refused again: the refusal must not freeze it
        clock.advance(ms=1)
        await _admitted(limiter, tenant)


async def test_calls_applied_out_of_order_do_not_refill_an_interval_twice(
    store: LimitStore,
) -> None:
    """Several routers share the limits' Redis: a call stamped a little earlier can reach it
    after a later one. Following that stamp back (as for a clock step) refilled the interval
    between them again: 3,065 admitted in 3 s against a limit of 1,800. Behind by less than a
    clock step, a bucket keeps its time."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(requests_per_min=60), clock)  # one a second
    for _ in range(60):
        await _admitted(limiter)
    await _denied(limiter)
    clock.advance(ms=-(CLOCK_STEP_BACK_MS // 2))  # another router's call, applied late
    await _denied(limiter)
    clock.advance(ms=CLOCK_STEP_BACK_MS // 2 + 1_000)  # a second after the bucket's time
    await _admitted(limiter)
    await _denied(limiter)  # one second refilled one request, not two


class _Broken:
    outlives_process = True  # a Redis that went away

    async def admit(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("redis went away")

    async def refusal_before_count(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("redis went away")

    async def settle(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("redis went away")

    async def close(self) -> None:
        return None


async def test_a_failing_store_admits_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    limiter = _limiter(_Broken(), LimitPolicy(requests_per_min=1), ManualClock(START_MS))
    ticket = await _admitted(limiter)
    limiter.settle(ticket, _answer(1, 1, cost_nanos=5))
    await limiter.drain()
    failures = [r.getMessage() for r in caplog.records if "limits store failed" in r.getMessage()]
    assert len(failures) == 2 and all("redis went away" in f for f in failures), failures


class _Switch:
    """A store that can go down (Redis unreachable) and come back."""

    def __init__(self, store: LimitStore) -> None:
        self.store = store
        self.down = False
        self.outlives_process = store.outlives_process

    async def admit(self, asked: Admission) -> Refusal | None:
        if self.down:
            raise ConnectionError("redis went away")
        return await self.store.admit(asked)

    async def refusal_before_count(
        self, tenant: str, policy: LimitPolicy, now_ms: int, periods: Periods
    ) -> Refusal | None:
        if self.down:
            raise ConnectionError("redis went away")
        return await self.store.refusal_before_count(tenant, policy, now_ms, periods)

    async def settle(self, done: Settlement) -> None:
        if self.down:
            raise ConnectionError("redis went away")
        await self.store.settle(done)

    async def close(self) -> None:
        await self.store.close()


@pytest.mark.parametrize("answered", [True, False])
async def test_a_request_admitted_while_the_store_was_down_gives_nothing_back(
    store: LimitStore, answered: bool
) -> None:
    """Admitted while Redis was down, nothing was reserved: when the request ends (Redis back)
    what it used is taken and nothing given back. Giving back its max_tokens, never taken,
    erased the tenant's debt (-4000 became -100, not -4100). Answered, or billed without its
    answer: the same."""
    clock = ManualClock(START_MS)
    switch = _Switch(store)
    limiter = _limiter(switch, LimitPolicy(tokens_per_min=1000), clock)
    ticket = await _admitted(limiter, reserve=5000)  # a full bucket: 1000 -> -4000
    limiter.settle(ticket, _answer(4000, 1000, cost_nanos=0))  # used all 5000: -4000
    await limiter.drain()
    switch.down = True
    degraded = await _admitted(limiter, reserve=4000)  # admitted, nothing reserved
    switch.down = False
    if answered:
        limiter.settle(degraded, _answer(60, 40, cost_nanos=0))
    else:
        limiter.charge(degraded, pb.Usage(input_tokens=60, output_tokens=40), 0)
    await limiter.drain()
    # -4100: 4105 tokens (to hold 5) at 1000 a minute
    assert (await _denied(limiter, reserve=HI + 1)).retry_after_ms == 246_300


async def test_a_wait_reads_in_seconds_then_minutes_then_hours(store: LimitStore) -> None:
    """Under 2 min in seconds, under 2 h in minutes, else in hours (150 s read "0.0 h")."""
    clock = ManualClock(START_MS)
    tokens = _limiter(store, LimitPolicy(tokens_per_min=1000), clock)
    await _admitted(tokens, reserve=3500)  # 1000 -> -2500: to hold 5, 2505 tokens, 150.3 s
    assert "retry in 2.5 min" in (await _denied(tokens, reserve=HI + 1)).message
    clock.advance(ms=150_300 - 90_000)
    assert "retry in 90.0 s" in (await _denied(tokens, reserve=HI + 1)).message
    midnight = Periods.at(START_MS).day_end_ms
    day = ManualClock(midnight - 7_200_000)
    budget = _limiter(store, LimitPolicy(day_budget_nanos=0), day)
    assert "it renews at 00:00 UTC, in 2.0 h" in (await _denied(budget)).message
    day.advance(ms=60_000)
    assert "it renews at 00:00 UTC, in 119.0 min" in (await _denied(budget)).message


async def test_no_limit_set_never_calls_the_store() -> None:
    limiter = _limiter(_Broken(), LimitPolicy(), ManualClock(START_MS))
    limiter.settle(await _admitted(limiter), _answer(1, 1, cost_nanos=5))
    await limiter.drain()


def test_periods_roll_over_at_the_year_end() -> None:
    periods = Periods.at(1_704_067_199_000)  # 2023-12-31 23:59:59 UTC
    assert (periods.day, periods.month) == ("2023-12-31", "2023-12")
    assert periods.day_end_ms == periods.month_end_ms == 1_704_067_200_000


def test_settings_read_dollars_exactly_and_name_a_bad_variable() -> None:
    settings = LimitSettings.from_env(
        Env(
            {
                "ROUTER_LIMIT_REQUESTS_PER_MIN": "60",
                "ROUTER_LIMIT_TOKENS_PER_MIN": "100000",
                "ROUTER_BUDGET_USD_PER_DAY": "0.50",
                "ROUTER_BUDGET_USD_PER_MONTH": "0",
            }
        )
    )
    assert settings.policy == LimitPolicy(60, 100_000, 500_000_000, 0)
    assert settings.redis_url is None and settings.timeout_s == 0.5
    assert LimitSettings.from_env(Env({"ROUTER_LIMITS_TIMEOUT_S": "0.2"})).timeout_s == 0.2
    assert LimitSettings.from_env(Env({})).policy == LimitPolicy()
    assert not LimitPolicy().active
    for name, value in [
        ("ROUTER_LIMIT_REQUESTS_PER_MIN", "0"),
        ("ROUTER_LIMIT_TOKENS_PER_MIN", "ten"),
        ("ROUTER_BUDGET_USD_PER_DAY", "-1"),
        ("ROUTER_BUDGET_USD_PER_DAY", "0.0000000001"),
        ("ROUTER_BUDGET_USD_PER_MONTH", "five dollars"),
        ("ROUTER_BUDGET_USD_PER_MONTH", "Infinity"),
        ("ROUTER_LIMITS_TIMEOUT_S", "0"),
    ]:
        with pytest.raises(ConfigError, match=name):
            LimitSettings.from_env(Env({name: value}))


# '1e3' was read as $1,000 a day, '1_000' as $1,000 and the Arabic-Indic digit five as $5, as
# `cachemesh admin limits set --day-budget` read them: a budget is written in plain digits
@pytest.mark.parametrize("value", ["1e3", "1E-3", "1_000", "\u0665", "++5"])
def test_a_budget_setting_in_exponent_or_other_notation_stops_the_start(value: str) -> None:
    with pytest.raises(ConfigError, match=r"ROUTER_BUDGET_USD_PER_DAY .*not 1e3 or 1_000"):
        LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": value}))
    day = LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": "1000."})).policy
    assert day.day_budget_nanos == 10**12
    # a sign is plain notation: '+25' was read as $25 before the rule, and is again
    plus = LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": "+25"})).policy
    assert plus.day_budget_nanos == 25 * 10**9


@pytest.mark.parametrize(
    "text", ["25", "+25", "0.50", "+.5", "1000.", "0", "-1", "1e3", "1_000", "+", "+-5", "nan"]
)
def test_a_budget_is_read_by_the_routers_own_rule(text: str) -> None:
    """'+25' was refused by the CLI and by ROUTER_BUDGET_USD_PER_DAY since the plain-digit
    rule, though Decimal read it as 25 before: a sign is taken, and the CLI and the router's
    setting read a budget by one rule (cachemesh.dollars), so they agree on every text."""
    try:
        by_cli: int | None = int(budget_change(text))
    except argparse.ArgumentTypeError:
        by_cli = None
    try:
        day = LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": text}))
        by_router: int | None = day.policy.day_budget_nanos
    except ConfigError:
        by_router = None
    if text.startswith("-"):  # the CLI leaves the range to the router
        assert by_cli == -1_000_000_000 and by_router is None
    else:
        assert by_cli == by_router


def test_retry_trailers_carry_retry_info_and_retry_after() -> None:
    trailers = retry_trailers(Code.RESOURCE_EXHAUSTED, "slow down", 1_500, "tenant:t", (TOKENS,))
    assert retry_delay_s(trailers) == 1.5
    assert ("retry-after", "2") in trailers  # whole seconds, rounded up
    status = status_details(trailers)
    assert status is not None and status.code == 8 and status.message == "slow down"
    assert retry_delay_s([("grpc-status-details-bin", b"\xff\xff")]) is None
    assert retry_delay_s([]) is None and retry_delay_s(None) is None


async def test_routers_whose_clocks_differ_share_a_bucket_on_redis_time(redis_url: str) -> None:
    """Two routers on one Redis, their clocks ten minutes apart and not moving. Stamped with
    each router's clock, a shared bucket was refilled by the skew on every turn (1,200 of
    3,000 got through a 600-a-minute limit), or, with the stamp kept monotonic, frozen for
    every router behind the one ahead. On Redis's clock: the burst, plus what real time
    refilled, and a refill reaches every router."""
    policy = LimitPolicy(requests_per_min=600)
    clients = [client_of(redis_url), client_of(redis_url)]
    clocks = [ManualClock(START_MS + 600_000), ManualClock(START_MS)]  # ahead, behind
    try:
        await clients[0].flushdb()
        routers = [
            _limiter(RedisLimitStore(c), policy, k) for c, k in zip(clients, clocks, strict=True)
        ]
        began = await clients[0].time()
        admitted = 0
        for i in range(1_500):
            admitted += isinstance(await routers[i % 2].admit("t", _request(1)), Ticket)
        # what the bucket refilled meanwhile, 600 a minute, on the clock its scripts read
        # (Redis's TIME, read before and after: no bound on how long the admits took)
        ended = await clients[0].time()
        refilled = (ended[0] - began[0] + (ended[1] - began[1]) / 1e6) * 10
        assert admitted <= 600 + refilled + 1, (admitted, refilled)
        await asyncio.sleep(0.3)  # 3 requests' worth
        assert isinstance(await routers[1].admit("t", _request(1)), Ticket)  # the one behind
    finally:
        for client in clients:
            await client.aclose()


class HangingStore(MemoryLimitStore):
    """A Redis that accepted the connection and never answers."""

    async def admit(self, *args: object, **kwargs: object) -> Refusal | None:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def settle(self, *args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()


async def test_a_store_that_hangs_admits_within_the_timeout() -> None:
    """The documented degradation (the request admitted) within ``timeout_s``, not after the
    Redis client's socket timeout (5 s by default) on every request."""
    counted: list[tuple[str, str]] = []
    limiter = Limiter(
        HangingStore(),
        UniformPolicies(LimitPolicy(requests_per_min=1)),
        ManualClock(START_MS),
        _count,
        timeout_s=0.05,
        counted=lambda dependency, reason: counted.append((dependency, reason)),
    )
    async with asyncio.timeout(2.0):
        ticket = await limiter.admit("t", _request())
        assert isinstance(ticket, Ticket)
        limiter.settle(ticket, _answer(1, 1, cost_nanos=1))
        await limiter.drain()  # the settle gave up too
    # admitted with no limit: counted where an operator (and the alert rules) can see it
    assert counted == [("limits", "DEADLINE_EXCEEDED")] * 2


async def test_routers_on_either_side_of_midnight_count_one_days_budget(redis_url: str) -> None:
    """Two routers on one Redis, their clocks five minutes before and after midnight UTC: the
    budget spent through one is spent for the other (each counted in its own day before)."""
    midnight = Periods.at(START_MS).day_end_ms
    policy = LimitPolicy(day_budget_nanos=1000)
    clients = [client_of(redis_url), client_of(redis_url)]
    clocks = [ManualClock(midnight - 300_000), ManualClock(midnight + 300_000)]
    try:
        await clients[0].flushdb()
        behind, ahead = (
            _limiter(RedisLimitStore(c), policy, k) for c, k in zip(clients, clocks, strict=True)
        )
        ticket = await behind.admit("t", _request(1))
        assert isinstance(ticket, Ticket)
        behind.settle(ticket, _answer(10, 10, cost_nanos=1000))  # the day's budget, spent
        await behind.drain()
        assert isinstance(await behind.admit("t", _request(1)), Denial)
        assert isinstance(await ahead.admit("t", _request(1)), Denial)
    finally:
        for client in clients:
            await client.aclose()


def _spent(client: Redis, day: str) -> Awaitable[Any]:
    return client.get(f"cachemesh:limits:{{t}}:spent:{day}")


async def test_a_settle_that_failed_while_redis_restarted_is_replayed_once_it_answers(
    tmp_path: Path,
) -> None:
    """An answer that ended while the limits' Redis restarted: its cost was never added to
    the day's spend (a $0.046 answer left no spend at all). It waits in the router's queue
    and is added when Redis answers again."""
    port = free_port()
    policy = LimitPolicy(day_budget_nanos=100 * NANOS)
    clock = ManualClock(START_MS)
    for run in ("before", "after"):
        (tmp_path / run).mkdir()
    with redis_server(tmp_path / "before", port=port) as url:
        client = client_of(url)
        limiter = _limiter(RedisLimitStore(client, server_time=False), policy, clock)
        ticket = await _admitted(limiter)
    limiter.settle(ticket, _answer(10, 10, cost_nanos=46_000_000))  # Redis is down
    await limiter.drain()
    with redis_server(tmp_path / "after", port=port):
        assert await _spent(client, Periods.at(START_MS).day) is None
        await limiter.replay_pending()
        assert int(await _spent(client, Periods.at(START_MS).day)) == 46_000_000
        await limiter.replay_pending()  # nothing left: counted once
        assert int(await _spent(client, Periods.at(START_MS).day)) == 46_000_000
        await limiter.close()


async def test_a_settle_redis_never_received_is_replayed_past_the_markers_life(
    tmp_path: Path,
) -> None:
    """Redis down, no connection made: the settle surely counted nothing, so it needs no
    marker and is replayed (once) whenever Redis is back within the queue's window."""
    port = free_port()
    lost: list[int] = []
    clock = ManualClock(START_MS)
    client = client_of(f"redis://127.0.0.1:{port}/0")
    policy = LimitPolicy(day_budget_nanos=100 * NANOS)
    limiter = Limiter(
        RedisLimitStore(client, server_time=False),
        UniformPolicies(policy),
        clock,
        _count,
        lost=lost.append,
        timeout_s=PATIENT_STORE_S,  # a late replay is ambiguous, kept pending (fail-open)
    )
    limiter.settle(Ticket("t", policy, 0), _answer(10, 10, cost_nanos=1_000))
    await limiter.drain()
    assert limiter.pending == 1
    clock.advance(ms=5 * SETTLE_MARKER_MS)
    with redis_server(tmp_path, port=port):
        await limiter.replay_pending()
        assert int(await _spent(client, Periods.at(START_MS).day)) == 1_000
        assert limiter.pending == 0 and lost == []
        await limiter.close()


@pytest.mark.parametrize(
    ("refuse", "accept"),
    [
        # full under noeviction (the README's advice: no eviction policy)
        (lambda r: r.config_set("maxmemory", 1), lambda r: r.config_set("maxmemory", 0)),
        # a replica (a failover that left the routers on it): read-only
        (lambda r: r.replicaof("127.0.0.1", free_port()), lambda r: r.replicaof("NO", "ONE")),
    ],
    ids=["oom", "readonly"],
)
async def test_a_settle_redis_refused_is_replayed_past_the_markers_life(
    tmp_path: Path,
    refuse: Callable[[Redis], Awaitable[Any]],
    accept: Callable[[Redis], Awaitable[Any]],
) -> None:
    """Redis answers the settle's script with an error (OOM, READONLY): it refused the script
    at its first write, the marker's, so nothing was counted and no marker is kept. Such a
    settle is replayed for the queue's whole window, as one never sent. Before, it was taken
    for ambiguous and dropped after AMBIGUOUS_REPLAY_MS: 5 bills of $0.001 while Redis was
    full for 61 s, spent today None, 5 settles lost."""
    lost: list[int] = []
    clock = ManualClock(START_MS)
    policy = LimitPolicy(day_budget_nanos=100 * NANOS)
    with redis_server(tmp_path) as url:
        client = client_of(url)
        limiter = Limiter(
            RedisLimitStore(client, server_time=False),
            UniformPolicies(policy),
            clock,
            _count,
            lost=lost.append,
            timeout_s=PATIENT_STORE_S,  # a slow test machine never times out (ambiguous)
        )
        await refuse(client)
        for _ in range(5):
            limiter.settle(Ticket("t", policy, 0), _answer(10, 10, cost_nanos=1_000_000))
        await limiter.drain()
        assert limiter.pending == 5 and await client.dbsize() == 0  # refused: no marker
        clock.advance(ms=5 * SETTLE_MARKER_MS)
        await limiter.replay_pending()  # still refused: they wait
        assert limiter.pending == 5 and lost == []
        await accept(client)
        await limiter.replay_pending()
        assert int(await _spent(client, Periods.at(START_MS).day)) == 5_000_000
        assert limiter.pending == 0 and lost == []
        await limiter.close()


PASSWORD = "Limits-S3cret"


async def _with_password(url: str) -> str:
    """Requires a password of the server at ``url`` (db 0); its URL with it, of db 1."""
    await require_password(url, PASSWORD)
    return url.replace("redis://", f"redis://:{PASSWORD}@").removesuffix("/0") + "/1"


@pytest.mark.parametrize("written_again_by", ["its next admit", "a router started after"])
async def test_a_limits_redis_that_lost_its_counts_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, written_again_by: str
) -> None:
    """The limits' Redis restarts without its data (no persistence): a tenant that spent 3x
    its daily budget is admitted again. Budgets count from zero (documented), but no longer
    silently: the running router logs one ERROR naming that Redis (not its password) and
    counts it, whether its own admit finds the store's id gone or a router started after the
    loss wrote a new one. Before: 3 of 3 admitted, nothing above INFO, no metric."""
    port = free_port()
    for run in ("before", "after"):
        (tmp_path / run).mkdir()
    resets: list[str] = []

    def build(url: str, who: str) -> Awaitable[Limiter]:
        settings = patient_limit_settings(
            {"ROUTER_BUDGET_USD_PER_DAY": "0.001", "ROUTER_LIMITS_REDIS_URL": url}
        )
        clock = ManualClock(START_MS)
        return build_limiter(settings, clock, TABLE, TOKENIZERS, reset=lambda: resets.append(who))

    with ExitStack() as before:
        server = before.enter_context(redis_server(tmp_path / "before", port=port))
        url = await _with_password(server)
        limiter = await build(url, "running")
        ticket = await _admitted(limiter)
        limiter.settle(ticket, _answer(10, 10, cost_nanos=3_000_000))  # 3x the day's budget
        await limiter.drain()
        assert isinstance(await limiter.admit("t", _request()), Denial)
        assert resets == []  # a new store is no loss
        await asyncio.to_thread(before.close)  # its counts gone with it; the loop runs meanwhile
    with redis_server(tmp_path / "after", port=port) as fresh:
        await _with_password(fresh)
        started = await build(url, "started") if written_again_by != "its next admit" else None
        # (small ones: each holds its largest bill of the $0.001 while in flight)
        admitted = [await limiter.admit("t", _request(10)) for _ in range(3)]
        assert all(isinstance(a, Ticket) for a in admitted)  # from zero, traffic never refused
        assert resets == ["running"]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "lost its counts" in errors[0], errors
        assert f"127.0.0.1:{port}/1" in errors[0] and PASSWORD not in errors[0]
        if started is not None:
            assert isinstance(await started.admit("t", _request()), Ticket)
            await started.close()
        assert resets == ["running"]
        await limiter.close()


async def test_a_limits_redis_that_refuses_to_keep_the_stores_id_stops_the_router(
    tmp_path: Path,
) -> None:
    """A read-only replica with no id at start-up cannot keep one, so it could not tell a
    later loss either: the router stops naming the variable and that Redis (no password),
    as for a Redis it cannot reach, rather than start counting on it."""
    with redis_server(tmp_path) as server:
        url = await _with_password(server)
        admin = client_of(url)
        try:
            await admin.replicaof("127.0.0.1", free_port())
            settings = patient_limit_settings(
                {"ROUTER_BUDGET_USD_PER_DAY": "1", "ROUTER_LIMITS_REDIS_URL": url}
            )
            with pytest.raises(ConfigError) as refused:
                await build_limiter(settings, ManualClock(START_MS), TABLE, TOKENIZERS)
        finally:
            await admin.aclose()
    message = str(refused.value)
    assert (
        message.startswith("ROUTER_LIMITS_REDIS_URL: Redis at redis://") and "read only" in message
    )
    assert PASSWORD not in message


async def test_a_router_started_while_its_limits_redis_is_down_counts_there_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The limits' Redis is down as the router starts (a restart during an outage). Before,
    the router refused to start (ConfigError, exit 2: the whole Gateway down until Redis came
    back and the supervisor's backoff let it try again). Now one WARNING names that Redis
    (not its password), requests are admitted without their limits meanwhile (as at run
    time), and once Redis answers they count there. The store's late first contact reads
    its id as a start would: no false "lost its counts", and a later loss is still seen."""
    caplog.set_level(logging.INFO)
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/1"
    settings = patient_limit_settings(
        {
            "ROUTER_LIMIT_REQUESTS_PER_MIN": "2",
            "ROUTER_LIMITS_REDIS_URL": url,
            "ROUTER_REDIS_BREAKER_S": "0",  # every admit tries Redis
        }
    )
    resets: list[int] = []
    limiter = await build_limiter(
        settings,
        ManualClock(START_MS),
        TABLE,
        TOKENIZERS,
        reset=lambda: resets.append(1),
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ROUTER_LIMITS_REDIS_URL" in w and f"127.0.0.1:{port}/1" in w for w in warned), (
        warned
    )
    await _admitted(limiter)  # Redis down: admitted without its limits
    with redis_server(tmp_path, port=port) as server:
        await _with_password(server)
        await _admitted(limiter)
        await _admitted(limiter)
        assert (await _denied(limiter)).limit == REQUESTS  # the 3rd of 2 a minute, in Redis
        assert resets == []
        assert any("holds no counts yet" in r.getMessage() for r in caplog.records)
        admin = client_of(url)
        try:
            await admin.flushdb()  # the counts lost: seen at the next admit
        finally:
            await admin.aclose()
        await _admitted(limiter)
        assert resets == [1]
        await limiter.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "lost its counts" in errors[0], errors
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


async def test_a_limits_redis_that_does_not_answer_at_start_up_delays_it_only_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that takes the connection and never answers (hung): the start-up waits for it
    at most ROUTER_LIMITS_TIMEOUT_S, then goes on without it (before: it waited forever)."""
    hole = BlackHole()
    try:
        url = hole.endpoint.replace("http://", "redis://") + "/0"
        env = Env({"ROUTER_LIMIT_REQUESTS_PER_MIN": "2", "ROUTER_LIMITS_REDIS_URL": url})
        limiter = await asyncio.wait_for(
            build_limiter(LimitSettings.from_env(env), ManualClock(START_MS), TABLE, TOKENIZERS),
            timeout=20,
        )
        assert any(
            r.levelno == logging.WARNING and "ROUTER_LIMITS_REDIS_URL" in r.getMessage()
            for r in caplog.records
        )
        await limiter.close()
    finally:
        hole.close()


async def test_a_wrong_password_for_the_limits_redis_still_stops_the_router(
    tmp_path: Path,
) -> None:
    """Redis answers but refuses the credentials: a configuration error, not an outage to
    wait out, so the router stops naming the variable and that Redis (no password)."""
    with redis_server(tmp_path) as server:
        url = (await _with_password(server)).replace(PASSWORD, "Not-The-Password")
        settings = patient_limit_settings(
            {"ROUTER_LIMIT_REQUESTS_PER_MIN": "2", "ROUTER_LIMITS_REDIS_URL": url}
        )
        with pytest.raises(ConfigError) as refused:
            await build_limiter(settings, ManualClock(START_MS), TABLE, TOKENIZERS)
    message = str(refused.value)
    assert message.startswith("ROUTER_LIMITS_REDIS_URL: ") and "redis://:***@127.0.0.1" in message
    assert "Not-The-Password" not in message


class AnsweredTooLate(RedisLimitStore):
    """Redis adds the spend, but its answer comes after the router gave up (the first time)."""

    late = 1

    async def settle(self, *args: Any, **kwargs: Any) -> None:
        await super().settle(*args, **kwargs)
        if self.late:
            self.late -= 1
            raise TimeoutError("no answer in time")


async def _settled_too_late(redis_url: str) -> tuple[Redis, Limiter, ManualClock, list[int]]:
    """A limiter on Redis whose one settle (1,000 nanos against a day budget) timed out after
    Redis ran it: the settle is pending, ambiguous. Returns the client, the limiter, the clock
    its replay windows run on (its ``ages``) and the list its lost settles are counted in."""
    client = client_of(redis_url)
    await client.flushdb()
    lost: list[int] = []
    ages = ManualClock(0)
    limiter = Limiter(
        AnsweredTooLate(client, server_time=False),
        UniformPolicies(LimitPolicy(day_budget_nanos=100 * NANOS)),
        ManualClock(START_MS),
        _count,
        lost=lost.append,
        ages=ages,
    )
    ticket = await _admitted(limiter)
    limiter.settle(ticket, _answer(10, 10, cost_nanos=1_000))
    await limiter.drain()
    return client, limiter, ages, lost


@pytest.mark.parametrize("replayed_after_ms", [0, AMBIGUOUS_REPLAY_MS])
async def test_a_settle_replayed_after_an_ambiguous_timeout_counts_once(
    redis_url: str, replayed_after_ms: int
) -> None:
    client, limiter, ages, lost = await _settled_too_late(redis_url)
    ages.advance(ms=replayed_after_ms)
    await limiter.replay_pending()
    assert int(await _spent(client, Periods.at(START_MS).day)) == 1_000
    assert limiter.pending == 0 and lost == []
    await limiter.close()


async def test_an_ambiguous_settle_is_given_up_once_its_marker_may_have_lapsed(
    redis_url: str,
) -> None:
    """A settle whose try timed out after Redis ran it is replayed only while its marker is
    surely kept: past that, a replay could count it twice, so it is dropped and counted lost
    (what the try counted stays counted)."""
    client, limiter, ages, lost = await _settled_too_late(redis_url)
    ages.advance(ms=AMBIGUOUS_REPLAY_MS + 1)
    await limiter.replay_pending()
    assert limiter.pending == 0 and lost == [1]
    assert int(await _spent(client, Periods.at(START_MS).day)) == 1_000  # the timed-out try's
    await limiter.close()


async def test_the_settles_markers_in_redis_last_only_as_long_as_a_replay_needs(
    redis_url: str,
) -> None:
    """Each settle's marker key expires within SETTLE_MARKER_MS (2 min), so Redis holds at
    most the settle rate times that many (500 answers/s: 60,000 keys), not 30 minutes'."""
    client = client_of(redis_url)
    await client.flushdb()
    limiter = _limiter(
        RedisLimitStore(client, server_time=False),
        LimitPolicy(tokens_per_min=100_000, day_budget_nanos=100 * NANOS),
        ManualClock(START_MS),
    )
    n = 200
    for _ in range(n):
        limiter.settle(await _admitted(limiter), _answer(10, 10, cost_nanos=1_000))
    await limiter.drain()
    markers = [key async for key in client.scan_iter(match="*:settled:*")]
    # and the tokens, the day's and month's spend, the store's id
    assert len(markers) == n and await client.dbsize() == n + 4
    ttls = [await client.pttl(key) for key in markers]
    assert all(0 < ttl <= SETTLE_MARKER_MS for ttl in ttls), max(ttls)
    await limiter.close()


async def test_open_calls_and_corrections_leave_the_store_nothing_past_a_settles_marker(
    store: LimitStore, redis_client: Redis | None
) -> None:
    """A killed router's open calls counted and kept answers' estimates corrected, as the
    outbox's replays do after an outage, each remember no more than an answer's settle: a
    marker kept SETTLE_MARKER_MS (for a replay after an ambiguous timeout), none in memory.
    Before, each kept a marker until its month had ended and a day more (~183 B each for up
    to ~32 days: an hour's outage at 500 answers/s held ~313 MiB of Redis for weeks), and the
    in-memory store an entry each until the month ended."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, LimitPolicy(day_budget_nanos=100 * NANOS), clock)
    n = 100
    for _ in range(n):
        limiter.count_unticketed("t", 1_000, started_ms=START_MS - 60_000)
        limiter.reconcile("t", -300, START_MS - 60_000)
        await limiter.drain()
    if redis_client is None:
        assert isinstance(store, MemoryLimitStore)
        held = {name: len(kept) for name, kept in vars(store).items() if isinstance(kept, dict)}
        assert sum(held.values()) == 2, held  # the day's and the month's spend
        return
    markers = [key async for key in redis_client.scan_iter(match="*:settled:*")]
    ttls = [await redis_client.pttl(key) for key in markers]
    assert len(ttls) == 2 * n and all(0 < ttl <= SETTLE_MARKER_MS for ttl in ttls), max(ttls)


class DownStore(MemoryLimitStore):
    async def settle(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Redis is down")


async def test_pending_settles_are_bounded_in_number_and_age_and_losses_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the bound (or the replay window) a settle is dropped: counted, logged once an
    interval, and no request waits for it."""
    lost: list[int] = []
    ages = ManualClock(0)  # the replay window's and the log line's clock (monotonic)
    limiter = Limiter(
        DownStore(),
        UniformPolicies(LimitPolicy(day_budget_nanos=NANOS)),
        ManualClock(START_MS),
        _count,
        lost=lost.append,
        max_pending=2,
        ages=ages,
    )
    for _ in range(4):
        limiter.settle(await _admitted(limiter), _answer(1, 1, cost_nanos=5))
    await limiter.drain()
    assert sum(lost) == 2 and limiter.pending == 2
    assert len([r for r in caplog.records if "settles lost" in r.message]) == 1
    ages.advance(ms=SETTLE_REPLAY_WINDOW_MS + 1)  # Redis down past the window
    await limiter.replay_pending()
    assert sum(lost) == 4 and limiter.pending == 0
    assert len([r for r in caplog.records if "settles lost" in r.message]) == 2
    await limiter.close()


async def test_pending_settles_are_replayed_by_themselves_when_the_store_is_back() -> None:
    store = MemoryLimitStore()
    switch = _Switch(store)
    policy = LimitPolicy(day_budget_nanos=NANOS)
    limiter = Limiter(
        switch, UniformPolicies(policy), ManualClock(START_MS), _count, replay_every_s=0.01
    )
    ticket = await _admitted(limiter)
    switch.down = True
    limiter.settle(ticket, _answer(1, 1, cost_nanos=NANOS))
    await limiter.drain()
    assert limiter.pending == 1
    switch.down = False
    replaying = limiter._settles.replaying
    assert replaying is not None
    await asyncio.wait_for(replaying, 5)
    assert limiter.pending == 0
    assert isinstance(await limiter.admit("t", _request(1)), Denial)  # the budget, spent


async def test_a_settle_redis_answers_loading_is_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis still loading its data after a restart answers every script ``LOADING``: it ran
    none of it. redis-py raises that as a connection error, which the limits took for an
    ambiguous settle (replayed for a minute only, then dropped); it is one never sent."""
    with redis_server(tmp_path) as url:
        client = client_of(url)
        store = RedisLimitStore(client, server_time=False)

        async def loading(**_: object) -> None:
            raise BusyLoadingError("Redis is loading the dataset in memory")

        monkeypatch.setattr(store, "_settle", loading)
        policy = LimitPolicy(day_budget_nanos=100 * NANOS)
        with pytest.raises(SettleNotSent):
            await store.settle(
                Settlement("t", policy, 0, 1_000, START_MS, Periods.at(START_MS), "id-1")
            )
        await store.close()


async def test_a_limits_redis_out_of_memory_at_start_up_does_not_stop_the_router(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis over its maxmemory under noeviction refuses the store id's write with OOM: an
    outage to wait out (memory frees, an operator raises it), not the router's configuration:
    before, the router stopped with a ConfigError and a restart kept failing until it passed."""
    with redis_server(tmp_path) as url:
        redis = client_of(url)
        try:
            await redis.set("ballast", "x" * 100_000)
            await redis.config_set("maxmemory-policy", "noeviction")
            await redis.config_set("maxmemory", "1")  # every write now answers OOM
            settings = patient_limit_settings(
                {"ROUTER_LIMIT_REQUESTS_PER_MIN": "2", "ROUTER_LIMITS_REDIS_URL": url}
            )
            with caplog.at_level(logging.WARNING, "services.router.limit_wiring"):
                limiter = await build_limiter(settings, ManualClock(START_MS), TABLE, TOKENIZERS)
            assert limiter is not None
            assert any("OutOfMemoryError" in r.getMessage() for r in caplog.records)
        finally:
            await redis.config_set("maxmemory", "0")
            await redis.aclose()


async def _workload(store: MemoryLimitStore) -> tuple[list[object], list[int]]:
    """5,000 calls of 8 tenants and 1,334 seen once, on an injected clock (seeded): admits,
    refusal checks and refunds, rates that change (a tenant's own limits), reservations over
    the rate (a bucket below 0), pauses of ms to minutes, calls out of order by less than a
    clock step (after a larger step back a forgotten bucket is full, where a kept one was
    taken back to its last level: the one difference, the router README's). What each call
    answered, and how many buckets the store held after each 500."""
    rng = random.Random(7)
    now = START_MS
    answers: list[object] = []
    held: list[int] = []
    for i in range(5_000):
        now += rng.choice((0, 10, 50, 400, 1_000, 3_000, 90_000))
        if i % 7 == 0:
            now -= rng.randrange(CLOCK_STEP_BACK_MS)  # calls out of order (not a step)
        # 8 tenants, and one a third of the calls that is never seen again (until the last
        # 1,000 calls)
        tenant = f"once {i}" if i < 4_000 and i % 3 == 0 else f"t{rng.randrange(8)}"
        rate = rng.choice((1, 2, 7, 60))
        policy = LimitPolicy(requests_per_min=rate, tokens_per_min=rate * 10)
        periods = Periods.at(now)
        call = rng.random()
        if call < 0.7:
            answers.append(
                await store.admit(Admission(tenant, policy, rng.randrange(1, 90), now, periods))
            )
        elif call < 0.85:
            answers.append(await store.refusal_before_count(tenant, policy, now, periods))
        else:
            await store.settle(Settlement(tenant, policy, rng.randrange(1, 40), 0, now, periods))
        if i % 500 == 499:
            held.append(len(store._buckets))
    return answers, held


async def test_a_refilled_bucket_is_forgotten_and_every_answer_is_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ROUTER_LIMIT_* set and no limits Redis, the store kept a bucket per tenant and
    kind for ever, full ones too: every tenant name ever seen stayed in memory. A bucket full
    whatever its rate is the same as a fresh one: forgotten on access and by the sweep of
    each write, the map shrinks back when tenants go quiet, and not one answer changes."""
    forgetting = MemoryLimitStore()
    answers, held = await _workload(forgetting)
    monkeypatch.setattr(memory_limits, "refilled_at_any_rate", lambda *_: False)
    keeping = MemoryLimitStore()  # as before: no bucket ever forgotten
    kept_answers, kept = await _workload(keeping)
    assert answers == kept_answers
    print(f"buckets after each 500 calls: kept {kept}, forgetting {held}")
    assert sum(isinstance(a, Refusal) for a in answers) > 500  # the limits did refuse
    assert kept[-1] > 2_000  # every tenant seen, both kinds
    assert max(held) < 200 and held[-1] <= 2 * 8 + 8, held  # those of the last minutes
