"""A tenant over its request rate, or with a budget spent, is refused before its prompt is
counted: a flood of large prompts past the rate, or from a tenant refused until the day or the
month ends, made the router tokenize each (~50 ms a megabyte of new text, on the CPU every
tenant shares) only to refuse it. Each test runs on both stores (in memory, and a real Redis)
with an injected clock, counting the prompt's counts through the limiter's seam."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.prompt import prompt_tokens
from services.common.tokens import load_cl100k
from services.router.limit_denials import Denial
from services.router.limit_policy import (
    DAY_BUDGET,
    MONTH_BUDGET,
    REQUESTS,
    TOKENS,
    LimitPolicy,
    Periods,
    UniformPolicies,
)
from services.router.limit_store import LimitStore
from services.router.limit_tickets import Ticket
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.redis_limits import RedisLimitStore
from tests.redis_server import client_of

START_MS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC: 6,400,000 ms before the day ends
TO_MIDNIGHT_MS = 6_400_000
TOKENIZER = load_cl100k()
# the limits store's wait: the service's 0.5 s fails open (admits unreserved) under load
PATIENT_S = 10.0
# about a megabyte of prompt, ~250,000 tokens: what a flood past the rate would send
BIG = "Summarise: " + "the quick brown fox jumps over the lazy dog " * 23_000


@pytest.fixture
def store(redis_client: Redis | None) -> LimitStore:
    if redis_client is None:
        return MemoryLimitStore()
    return RedisLimitStore(redis_client, server_time=False)  # the tests' clock, injected


class Counted:
    """The limiter's prompt count, with the requests it counted."""

    def __init__(self) -> None:
        self.counted: list[pb.CompleteRequest] = []

    def __call__(self, request: pb.CompleteRequest) -> int:
        self.counted.append(request)
        return prompt_tokens(request, TOKENIZER)


def _request(text: str = BIG, max_tokens: int = 100) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
    )


def _limiter(store: LimitStore, policy: LimitPolicy, clock: ManualClock) -> tuple[Limiter, Counted]:
    count = Counted()
    return Limiter(store, UniformPolicies(policy), clock, count, timeout_s=PATIENT_S), count


async def test_a_request_over_its_request_rate_is_refused_before_its_prompt_is_counted(
    store: LimitStore,
) -> None:
    """Two a minute: the third large prompt is refused, as ever, and never tokenized."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(requests_per_min=2, tokens_per_min=10_000_000)
    limiter, count = _limiter(store, policy, clock)
    for _ in range(2):
        assert isinstance(await limiter.admit("t", _request()), Ticket)
    assert len(count.counted) == 2
    flood = [await limiter.admit("t", _request()) for _ in range(5)]
    assert len(count.counted) == 2  # none of the refused was counted
    for denial in flood:
        assert isinstance(denial, Denial), denial
        assert (denial.limit, denial.retry_after_ms, denial.exceeded) == (
            REQUESTS,
            30_000,
            (REQUESTS,),
        )
        assert denial.message == (
            "rate limit: this tenant may send 2 requests a minute; retry in 30.0 s"
        )
    clock.advance(ms=30_000)  # one request refilled: counted and admitted
    assert isinstance(await limiter.admit("t", _request()), Ticket)
    assert len(count.counted) == 3


async def test_a_refusal_for_the_rate_still_names_a_spent_budget_with_its_longer_wait(
    store: LimitStore,
) -> None:
    """Over its request rate and its daily budget: the wait is still the day's end, naming
    the rate too (waiting only for the rate, it would be refused again), and nothing counted."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(requests_per_min=1, tokens_per_min=10_000_000, day_budget_nanos=1000)
    limiter, count = _limiter(store, policy, clock)
    ticket = await limiter.admit("t", _request("hi"))
    assert isinstance(ticket, Ticket)
    limiter.settle(ticket, pb.CompleteResponse(cost=pb.Cost(cost_nanos=1000)))
    await limiter.drain()
    denial = await limiter.admit("t", _request())
    assert isinstance(denial, Denial), denial
    assert (denial.limit, denial.retry_after_ms) == (DAY_BUDGET, TO_MIDNIGHT_MS)
    assert denial.exceeded == (DAY_BUDGET, REQUESTS)
    assert denial.message == (
        "budget: this tenant's daily budget of $0.000001 is spent; it renews at 00:00 UTC, "
        "in 106.7 min (this tenant is over its request rate too)"
    )
    assert len(count.counted) == 1  # the first, admitted request's


async def test_a_request_the_rate_admits_is_counted_and_refused_for_tokens_taking_no_slot(
    store: LimitStore,
) -> None:
    """Within the rate, the large prompt is counted and the token rate checked as before;
    refused there, the request takes no request of the rate (nor tokens): the next two fit."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(requests_per_min=3, tokens_per_min=1000)
    limiter, count = _limiter(store, policy, clock)
    first = await limiter.admit("t", _request("hi", max_tokens=996))  # reserves all 1000
    assert isinstance(first, Ticket)
    denial = await limiter.admit("t", _request())  # more than a minute's: waits for 1000
    assert isinstance(denial, Denial), denial
    assert (denial.limit, denial.retry_after_ms, denial.exceeded) == (TOKENS, 60_000, (TOKENS,))
    assert "it is admitted only when all 1000 are free; retry in 60.0 s" in denial.message
    assert len(count.counted) == 2
    limiter.settle(first, pb.CompleteResponse())  # used nothing: its 1000 tokens back
    await limiter.drain()
    for _ in range(2):  # requests 2 and 1 left of 3: the refusal took none
        assert isinstance(await limiter.admit("t", _request("hi", max_tokens=96)), Ticket)
    assert isinstance(await limiter.admit("t", _request("hi")), Denial)


async def test_over_both_rates_a_large_prompt_is_refused_for_the_request_rate_uncounted(
    store: LimitStore,
) -> None:
    """Over the request rate (30 s) and the token rate (50 s): a small prompt is counted and
    told the token rate's wait, as ever; a large one is refused without its count, so for the
    request rate, whose wait is all that is known (its next try is counted and told the
    token rate's wait)."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(requests_per_min=2, tokens_per_min=600)
    limiter, count = _limiter(store, policy, clock)
    for _ in range(2):  # 600 -> 0 tokens, 2 -> 0 requests
        assert isinstance(await limiter.admit("t", _request("hi", max_tokens=296)), Ticket)
    small = await limiter.admit("t", _request("hi", max_tokens=496))
    assert isinstance(small, Denial) and small.exceeded == (TOKENS, REQUESTS), small
    assert small.retry_after_ms == 50_000 and len(count.counted) == 3
    large = await limiter.admit("t", _request())
    assert isinstance(large, Denial) and large.exceeded == (REQUESTS,), large
    assert large.retry_after_ms == 30_000 and len(count.counted) == 3
    clock.advance(ms=30_000)
    again = await limiter.admit("t", _request())
    assert isinstance(again, Denial) and again.exceeded == (TOKENS,), again
    assert again.retry_after_ms == 30_000 and len(count.counted) == 4  # 300 of 600 refilled


async def test_a_rate_taken_by_another_router_while_counting_is_still_refused(
    store: LimitStore,
) -> None:
    """The rate read before the count is no reservation: a router that takes the last
    request meanwhile leaves this one refused by the admit itself, never both admitted."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(requests_per_min=1, tokens_per_min=10_000_000)
    other, _ = _limiter(store, policy, clock)
    loop = asyncio.get_running_loop()
    taken: list[Ticket | Denial] = []

    def count_while_another_admits(request: pb.CompleteRequest) -> int:
        # runs off the event loop, as the limiter's counts do: the other router admits now
        taken.append(asyncio.run_coroutine_threadsafe(other.admit("t", request), loop).result())
        return prompt_tokens(request, TOKENIZER)

    limiter = Limiter(
        store, UniformPolicies(policy), clock, count_while_another_admits, timeout_s=PATIENT_S
    )
    denial = await limiter.admit("t", _request())  # its rate read first: one request left
    assert len(taken) == 1 and isinstance(taken[0], Ticket)  # the other's (counted by it)
    assert isinstance(denial, Denial) and denial.limit == REQUESTS, denial


async def _redis_ms(client: Redis) -> float:
    """Redis's clock (its ``TIME``, which the limits' scripts read), in milliseconds."""
    seconds, micros = await client.time()
    return seconds * 1000 + micros / 1000


async def test_routers_on_redis_time_refuse_over_the_rate_without_counting(
    redis_url: str,
) -> None:
    """On Redis's clock (the routers' own ten minutes apart) the read of the rate agrees with
    the admit: the second request of one a minute is refused uncounted, whichever router."""
    policy = LimitPolicy(requests_per_min=1, tokens_per_min=10_000_000)
    clients = [client_of(redis_url), client_of(redis_url)]
    try:
        await clients[0].flushdb()
        routers = [
            _limiter(RedisLimitStore(client), policy, ManualClock(START_MS + skew))
            for client, skew in zip(clients, (600_000, 0), strict=True)
        ]
        first = await _redis_ms(clients[0])
        assert isinstance(await routers[0][0].admit("t", _request()), Ticket)
        for limiter, _ in routers:
            denial = await limiter.admit("t", _request())
            assert isinstance(denial, Denial) and denial.limit == REQUESTS, denial
            # a minute from the admitted request, less what Redis's clock ran meanwhile (read
            # from Redis before and after: no bound on how long the calls took; 1 ms rounding)
            ran = await _redis_ms(clients[0]) - first
            assert 60_000 - ran - 1 <= denial.retry_after_ms <= 60_000, (denial, ran)
        assert [len(count.counted) for _, count in routers] == [1, 0]
    finally:
        for client in clients:
            await client.aclose()


async def _spend(limiter: Limiter, cost_nanos: int) -> None:
    """One small request admitted and billed ``cost_nanos``."""
    ticket = await limiter.admit("t", _request("hi"))
    assert isinstance(ticket, Ticket), ticket
    limiter.settle(ticket, pb.CompleteResponse(cost=pb.Cost(cost_nanos=cost_nanos)))
    await limiter.drain()


@pytest.mark.parametrize("requests_per_min", [None, 100])
async def test_a_tenant_over_its_day_budget_is_refused_before_its_prompt_is_counted(
    store: LimitStore, requests_per_min: int | None
) -> None:
    """A spent budget refills only at the day's end: a flood of large prompts from the tenant
    is refused, as ever (the refusal the admit makes after the count: the same limit, wait and
    message), and none of it tokenized, whether or not a request rate is set (within it)."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(
        requests_per_min=requests_per_min, tokens_per_min=10_000_000, day_budget_nanos=1000
    )
    limiter, count = _limiter(store, policy, clock)
    await _spend(limiter, 1000)
    small = await limiter.admit("t", _request("hi"))  # counted, refused by the admit
    assert isinstance(small, Denial), small
    assert (small.limit, small.retry_after_ms, small.exceeded) == (
        DAY_BUDGET,
        TO_MIDNIGHT_MS,
        (DAY_BUDGET,),
    )
    assert len(count.counted) == 2
    flood = [await limiter.admit("t", _request()) for _ in range(5)]
    assert flood == [small] * 5
    assert len(count.counted) == 2  # none of the large prompts was counted


async def test_over_both_budgets_a_large_prompt_is_told_the_months_end_uncounted(
    store: LimitStore,
) -> None:
    """Over the day's and the month's budgets (no request rate): the wait is the month's end,
    naming the day's budget too, as the admit says it, and nothing counted."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(tokens_per_min=10_000_000, day_budget_nanos=1000, month_budget_nanos=1000)
    limiter, count = _limiter(store, policy, clock)
    await _spend(limiter, 1000)
    small = await limiter.admit("t", _request("hi"))
    assert isinstance(small, Denial), small
    assert (small.limit, small.exceeded) == (MONTH_BUDGET, (MONTH_BUDGET, DAY_BUDGET))
    assert small.retry_after_ms == Periods.at(START_MS).month_end_ms - START_MS
    assert small.message.endswith("(this tenant is over its daily budget too)")
    large = await limiter.admit("t", _request())
    assert large == small and len(count.counted) == 2


async def test_a_budget_not_spent_lets_a_large_prompt_be_counted_and_admitted(
    store: LimitStore,
) -> None:
    """Below its budget (one nano short), the large prompt is counted and admitted as ever."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(tokens_per_min=10_000_000, day_budget_nanos=1000)
    limiter, count = _limiter(store, policy, clock)
    await _spend(limiter, 999)
    assert isinstance(await limiter.admit("t", _request()), Ticket)
    assert len(count.counted) == 2


async def test_without_a_token_rate_no_prompt_is_counted_over_a_budget_or_not(
    store: LimitStore,
) -> None:
    """The count is only for the token rate: without one, no prompt is counted, and a spent
    budget refuses the large prompt as the admit always has."""
    clock = ManualClock(START_MS)
    policy = LimitPolicy(requests_per_min=100, day_budget_nanos=1000)
    limiter, count = _limiter(store, policy, clock)
    await _spend(limiter, 1000)
    denial = await limiter.admit("t", _request())
    assert isinstance(denial, Denial) and denial.limit == DAY_BUDGET, denial
    assert count.counted == []


async def test_routers_on_redis_time_refuse_a_spent_budget_without_counting(
    redis_url: str,
) -> None:
    """On Redis's clock (the routers' own in another day, ten minutes apart) the budget read
    before the count is the day's Redis counts in: a large prompt past it is refused uncounted,
    whichever router, waiting for Redis's midnight."""
    policy = LimitPolicy(tokens_per_min=10_000_000, day_budget_nanos=1000)
    clients = [client_of(redis_url), client_of(redis_url)]
    try:
        await clients[0].flushdb()
        routers = [
            _limiter(RedisLimitStore(client), policy, ManualClock(START_MS + skew))
            for client, skew in zip(clients, (600_000, 0), strict=True)
        ]
        await _spend(routers[0][0], 1000)
        for limiter, _ in routers:
            denial = await limiter.admit("t", _request())
            assert isinstance(denial, Denial) and denial.limit == DAY_BUDGET, denial
            assert 0 < denial.retry_after_ms <= 86_400_000
        assert [len(count.counted) for _, count in routers] == [1, 0]
    finally:
        for client in clients:
            await client.aclose()


async def test_the_read_before_the_count_is_one_round_trip_to_redis(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request bucket and both budgets are read in one round trip, refusing or not."""
    sent: list[object] = []
    send = Connection.send_packed_command

    async def counted(self: Connection, command: object, check_health: bool = True) -> None:
        sent.append(command)
        await send(self, command, check_health)  # type: ignore[arg-type]

    client = client_of(redis_url)
    try:
        await client.flushdb()
        store = RedisLimitStore(client, server_time=False)
        policy = LimitPolicy(
            requests_per_min=100, tokens_per_min=10, day_budget_nanos=1, month_budget_nanos=1
        )
        periods = Periods.at(START_MS)
        monkeypatch.setattr(Connection, "send_packed_command", counted)
        assert await store.refusal_before_count("t", policy, START_MS, periods) is None
        assert len(sent) == 1
        await client.set(f"cachemesh:limits:{{t}}:spent:{periods.day}", 1)
        sent.clear()
        refusal = await store.refusal_before_count("t", policy, START_MS, periods)
        assert refusal is not None and refusal.limit == DAY_BUDGET, refusal
        assert len(sent) == 1
    finally:
        await client.aclose()
