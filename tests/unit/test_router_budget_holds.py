"""Requests racing a tenant's budget (services.router.limits ``Hold``), on both stores (in
memory and a real Redis, tests/unit/conftest.py) with an injected clock.

A budget admitted every request while the spend was below it, and a request's cost reached
the spend only at its end: 40 requests in flight at once, each billed $0.0046 (sim-large, 300
output tokens), were all admitted against a $0.01 day budget and spent $0.189, 19x it (two
routers on one Redis, real processes: 39 answers, $0.044949). Now each request holds its
largest bill while it runs and is admitted only while the spend plus the holds is below the
budget: the spend passes the budget by at most one request's bill.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.env import Env
from services.common.model_overrides import model_table_from_env
from services.common.models import load_model_table
from services.common.tokens import load_tokenizers
from services.router.limit_denials import Denial
from services.router.limit_policy import DAY_BUDGET
from services.router.limit_settings import LimitSettings
from services.router.limit_store import (
    HELD_RETRY_MS,
    HOLD_MS,
    HOLD_SLACK_MS,
    LimitStore,
    Settlement,
)
from services.router.limit_tickets import ModelUse, Ticket
from services.router.limit_wiring import limiter_on, most_billed
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.prompt_counts import count_prompt
from services.router.redis_limits import RedisLimitStore
from tests.unit.gateway_support import patient_limit_settings

START_MS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())
BUDGET_NANOS = 10_000_000  # $0.01 a day


@pytest.fixture
def store(redis_client: Redis | None) -> LimitStore:
    if redis_client is None:
        return MemoryLimitStore()
    return RedisLimitStore(redis_client, server_time=False)  # the tests' clock, injected


def _limiter(store: LimitStore, clock: ManualClock) -> Limiter:
    settings = patient_limit_settings({"ROUTER_BUDGET_USD_PER_DAY": "0.01"})
    return limiter_on(store, settings, clock, TABLE, TOKENIZERS)


def _request(i: int, max_tokens: int = 300) -> pb.CompleteRequest:
    text = f"Write a long essay about budgets, number {i}"
    return pb.CompleteRequest(
        model="sim-large",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
    )


def _answer(cost_nanos: int) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        served_by=pb.LAYER_MODEL,
        usage=pb.Usage(input_tokens=12, output_tokens=300),
        cost=pb.Cost(cost_nanos=cost_nanos),
    )


def _answered(limiter: Limiter, ticket: Ticket, cost_nanos: int) -> None:
    use = ModelUse()
    use.model_sent()
    limiter.finish(ticket, _answer(cost_nanos), use)


async def test_requests_racing_the_last_of_a_budget_take_it_past_by_one_bill_at_most(
    store: LimitStore,
) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, clock)
    # the tenant spent $0.009 of its $0.01 already
    spent = await limiter.admit("t", _request(0))
    assert isinstance(spent, Ticket)
    _answered(limiter, spent, 9_000_000)
    await limiter.drain()

    results = await asyncio.gather(*(limiter.admit("t", _request(i)) for i in range(1, 41)))
    admitted = [r for r in results if isinstance(r, Ticket)]
    refused = [r for r in results if isinstance(r, Denial)]
    bill = 300 * 15_000  # each billed its 300 output tokens at sim-large's $15/M
    for ticket in admitted:
        _answered(limiter, ticket, bill)
    await limiter.drain()
    total = 9_000_000 + bill * len(admitted)
    print(f"admitted {len(admitted)} of 40, spend {total:,} of {BUDGET_NANOS:,} nanos")
    assert len(admitted) == 1 and len(refused) == 39  # before: 40 of 40, $0.189 spent
    assert total <= BUDGET_NANOS + bill
    assert refused[0].limit == DAY_BUDGET
    assert isinstance(await limiter.admit("t", _request(99)), Denial)  # spent now
    await limiter.close()


async def test_a_budget_held_by_requests_in_flight_refuses_briefly_and_says_so(
    store: LimitStore,
) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, clock)
    first = await limiter.admit("t", _request(1, max_tokens=700))  # holds > $0.01
    assert isinstance(first, Ticket) and first.hold is not None
    assert first.hold.nanos > BUDGET_NANOS
    held = await limiter.admit("t", _request(2, max_tokens=10))
    assert isinstance(held, Denial)
    assert held.limit == DAY_BUDGET and held.retry_after_ms == HELD_RETRY_MS  # not midnight
    assert "spent or held: 1 of its admitted requests hold $0.010" in held.message
    assert "retry in 5.0 s" in held.message
    _answered(limiter, first, 1_000_000)  # billed $0.001: its hold goes with its end
    await limiter.drain()
    assert isinstance(await limiter.admit("t", _request(3, max_tokens=10)), Ticket)
    await limiter.close()


async def test_a_request_that_ends_unanswered_or_modelless_releases_its_hold(
    store: LimitStore,
) -> None:
    clock = ManualClock(START_MS)
    limiter = _limiter(store, clock)
    for modelless, sent in ((True, 0), (False, 0), (False, 1)):  # L1, cancelled early, failed
        ticket = await limiter.admit("t", _request(1, max_tokens=700))
        assert isinstance(ticket, Ticket), (modelless, sent)
        use = ModelUse()
        for _ in range(sent):
            use.model_sent()
        limiter.finish(ticket, None, use, modelless=modelless)
        await limiter.drain()
    await limiter.close()


async def test_a_request_cancelled_mid_answer_holds_the_budget_until_its_bill_is_counted(
    store: LimitStore,
) -> None:
    """A request whose caller left mid-answer released its hold at its end, before its cut
    call's bill came (``charge``, in the background): admits in between saw neither the hold
    nor the cost, 10 of 10 admitted and 43,500,000 nanos spent on a 10,000,000 budget. Its
    hold now goes once its bills are done, after the cost they told is counted."""
    clock = ManualClock(START_MS)
    limiter = _limiter(store, clock)
    loop = asyncio.get_running_loop()
    bill = 290 * 15_000  # each cut call billed its 290 output tokens at sim-large's $15/M
    cut: list[tuple[Ticket, asyncio.Future[None]]] = []
    for i in range(10):
        ticket = await limiter.admit("t", _request(i))
        if not isinstance(ticket, Ticket):
            assert ticket.limit == DAY_BUDGET
            break
        use = ModelUse()
        use.model_sent()
        coming: asyncio.Future[None] = loop.create_future()
        limiter.finish(ticket, None, use, bills=[coming])  # its caller left mid-answer
        await limiter.drain()
        cut.append((ticket, coming))
    for ticket, coming in cut:  # the cut calls' bills, counted as each is done
        limiter.charge(ticket, pb.Usage(input_tokens=12, output_tokens=290), bill)
        coming.set_result(None)
    await asyncio.sleep(0)
    await limiter.drain()
    spent = bill * len(cut)
    print(f"admitted {len(cut)} of 10, spend {spent:,} of {BUDGET_NANOS:,} nanos")
    assert spent <= BUDGET_NANOS + bill  # before: 10 admitted, 43,500,000 nanos
    assert len(cut) == 3  # admitted while the holds ($0.0046 each) are below $0.01
    # the bills are counted and the holds gone with them: the budget is spent, not held
    after = await limiter.admit("t", _request(99, max_tokens=10))
    assert isinstance(after, Denial) and "is spent" in after.message, after
    assert "hold" not in after.message
    await limiter.close()


class _Blip(MemoryLimitStore):
    """A store whose settles fail while ``down`` (a Redis blip), its admits answered."""

    down = False

    async def settle(self, done: Settlement) -> None:
        if self.down:
            raise ConnectionError("Redis is down")
        await super().settle(done)


async def test_a_release_alone_that_fails_is_replayed() -> None:
    """A settle that only released a hold (a request that used nothing: an L1 hit, refused
    before its model call) was dropped when the store failed: the hold then refused the
    tenant "retry in 5 s" until it lapsed, a minute past the request's deadline (15 min
    without one). It is replayed as any settle is, and released once."""
    blip = _Blip()
    clock = ManualClock(START_MS)
    limiter = _limiter(blip, clock)
    ticket = await limiter.admit("t", _request(1, max_tokens=700))  # holds > $0.01
    assert isinstance(ticket, Ticket) and ticket.hold is not None
    blip.down = True
    limiter.finish(ticket, None, ModelUse(), modelless=True)  # an L1 hit: a release alone
    await limiter.drain()
    assert limiter.pending == 1  # before: 0, dropped
    blip.down = False
    assert isinstance(await limiter.admit("t", _request(2, max_tokens=10)), Denial)  # held
    await limiter.replay_pending()
    assert limiter.pending == 0
    assert isinstance(await limiter.admit("t", _request(3, max_tokens=10)), Ticket)
    await limiter.replay_pending()  # nothing left
    await limiter.close()


async def test_the_hold_of_a_request_whose_router_died_lapses(store: LimitStore) -> None:
    clock = ManualClock(START_MS)
    dead = _limiter(store, clock)  # its requests never end
    assert isinstance(await dead.admit("t", _request(1, max_tokens=700)), Ticket)
    other = _limiter(store, clock)
    assert isinstance(await other.admit("t", _request(2, max_tokens=10)), Denial)
    clock.advance(ms=HOLD_MS)
    assert isinstance(await other.admit("t", _request(3, max_tokens=10)), Ticket)
    await other.close()


async def test_the_hold_of_a_request_with_a_deadline_lapses_a_minute_after_it(
    store: LimitStore,
) -> None:
    """A killed router's request held its tenant's budget for 15 min (``HOLD_MS``): with a
    deadline, only until that deadline and a minute for its settle."""
    clock = ManualClock(START_MS)
    dead = _limiter(store, clock)
    held = await dead.admit("t", _request(1, max_tokens=700), time_remaining_s=30.0)
    assert isinstance(held, Ticket) and held.hold is not None
    assert held.hold.ms == 30_000 + HOLD_SLACK_MS
    other = _limiter(store, clock)
    clock.advance(ms=30_000 + HOLD_SLACK_MS - 1)
    assert isinstance(await other.admit("t", _request(2, max_tokens=10)), Denial)
    clock.advance(ms=1)
    assert isinstance(await other.admit("t", _request(3, max_tokens=10)), Ticket)
    await other.close()


async def test_a_killed_routers_holds_are_named_held_not_in_flight_with_their_lapse(
    store: LimitStore,
) -> None:
    """A router killed with requests admitted (the HTTP front's 600 s deadline) left their
    holds for 11 min, and the tenant was refused "retry in 5 s" with a message saying its
    requests were "in flight": none ran. It says they are held until they end or lapse, and
    when the soonest lapses (the retry stays 5 s: a live request may end sooner)."""
    clock = ManualClock(START_MS)
    dead = _limiter(store, clock)  # killed: its requests never end
    held = await dead.admit("t", _request(1, max_tokens=700), time_remaining_s=600.0)
    assert isinstance(held, Ticket)
    other = _limiter(store, clock)
    clock.advance(ms=60_000)
    refused = await other.admit("t", _request(2, max_tokens=10))
    assert isinstance(refused, Denial) and refused.retry_after_ms == HELD_RETRY_MS
    print(refused.message)
    assert "in flight" not in refused.message
    assert "1 of its admitted requests hold $0.010" in refused.message
    assert "until their holds lapse (the soonest in 10.0 min)" in refused.message
    assert "retry in 5.0 s" in refused.message
    await other.close()


@pytest.mark.parametrize(
    ("model", "max_tokens", "at_once"),
    [("claude-sonnet-4-5", 8192, 8), ("gpt-4o", 16_384, 7), ("gpt-5", 128_000, 1)],
)
async def test_the_readmes_cap_on_requests_at_once_under_a_budget(
    model: str, max_tokens: int, at_once: int
) -> None:
    """The router README's figures (budgets paragraph): $1 a day and a 1k-token prompt admit
    about the budget divided by each request's largest bill at once (gpt-4o and gpt-5 at the
    max_tokens the HTTP front sends an OpenAI caller that sets none: their output limits)."""
    settings = LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": "1"}))
    limiter = limiter_on(MemoryLimitStore(), settings, ManualClock(START_MS), TABLE, TOKENIZERS)
    spec = TABLE.get(model)
    assert spec is not None and (
        model == "claude-sonnet-4-5" or spec.max_output_tokens == max_tokens
    )
    text = " ".join(f"word{i}" for i in range(500))  # ~1k tokens
    request = pb.CompleteRequest(
        model=model,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
    )
    admitted = 0
    while isinstance(await limiter.admit("t", request), Ticket):
        admitted += 1
        assert admitted <= 100
    assert admitted == at_once
    await limiter.close()


class _CostsFail(MemoryLimitStore):
    """A store whose settles carrying a cost fail while ``down``; releases alone pass."""

    down = True

    async def settle(self, done: Settlement) -> None:
        if self.down and done.cost_nanos > 0:
            raise ConnectionError("Redis blip")
        await super().settle(done)


async def test_a_release_waits_behind_its_requests_cost_queued_for_a_replay() -> None:
    """A cut call's cost whose first try failed waited in the replay queue while its
    request's release, sent after that try, went through: until the replay, admits saw
    neither the hold nor the cost (20 of 20 admitted, 87,000,000 nanos on a 10,000,000
    budget). The release now queues behind the cost, and the queue replays in order."""
    store = _CostsFail()
    clock = ManualClock(START_MS)
    limiter = _limiter(store, clock)
    loop = asyncio.get_running_loop()
    bill = 290 * 15_000
    admitted = 0
    for i in range(20):
        ticket = await limiter.admit("t", _request(i))
        if not isinstance(ticket, Ticket):
            break
        admitted += 1
        use = ModelUse()
        use.model_sent()
        coming: asyncio.Future[None] = loop.create_future()
        limiter.finish(ticket, None, use, bills=[coming])  # cut mid-answer, its bill to come
        limiter.charge(ticket, pb.Usage(input_tokens=5, output_tokens=290), bill)
        coming.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)
        await limiter.drain()
    print(f"admitted {admitted} of 20, pending {limiter.pending}")
    assert admitted * bill <= BUDGET_NANOS + bill  # before: 20 admitted, 87,000,000 nanos
    store.down = False
    await limiter.replay_pending()
    assert limiter.pending == 0
    denial = await limiter.admit("t", _request(99, max_tokens=10))
    assert isinstance(denial, Denial) and "hold" not in denial.message, denial
    await limiter.close()


async def test_an_auto_request_holds_the_largest_bill_of_any_of_its_tiers() -> None:
    """Two tiers need not be ordered by price: Claude Haiku 4.5 small writes a 1h cache at
    2,000 nanos a token, GPT-5 large takes input at 1,250. ``auto`` held the large tier's
    largest bill alone: 27,565,000 nanos for a 20k-token prompt and 256 tokens of answer,
    which the small tier, its 1h writes, can bill at 41,288,000 (the budget's N requests in
    flight spent past it by N such gaps). Now the dearer of the two."""
    table = model_table_from_env(
        Env({"CACHEMESH_AUTO_SMALL": "claude-haiku-4-5", "CACHEMESH_AUTO_LARGE": "gpt-5"})
    )
    settings = LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": "100"}))
    limiter = limiter_on(MemoryLimitStore(), settings, ManualClock(START_MS), table, TOKENIZERS)
    text = "budget " * 20_000
    request = pb.CompleteRequest(
        model="auto",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=256,
    )
    ticket = await limiter.admit("t", request)
    assert isinstance(ticket, Ticket) and ticket.hold is not None
    prompt = count_prompt(request, TOKENIZERS.for_spec(table.baseline_for("auto")))
    assert prompt * 1_250 + 256 * 10_000 == 27_565_000  # gpt-5's largest bill, held before
    assert table.for_tier("small").rates(prompt).cache_write_1h_nanos == 2_000
    assert ticket.hold.nanos == prompt * 2_000 + 256 * 5_000 == 41_288_000
    await limiter.close()


async def test_an_auto_hold_counts_the_prompt_in_each_tiers_own_vocabulary() -> None:
    """Claude Haiku 4.5 small counts with cl100k, GPT-5 large with o200k: ``auto`` held the
    prompt's o200k count (the large tier's) at each tier's price, and a Japanese prompt is
    27,004 o200k tokens but 39,003 of cl100k: the small tier's largest bill was under-held
    (55,288,000 held, 79,286,000 billable; 20 requests racing a $0.50 budget spent 1.59x of
    it, one bill over being 1.16x). Now each tier's bill at its own count."""
    table = model_table_from_env(
        Env({"CACHEMESH_AUTO_SMALL": "claude-haiku-4-5", "CACHEMESH_AUTO_LARGE": "gpt-5"})
    )
    small, large = table.for_tier("small"), table.for_tier("large")
    assert small.tokenizer != large.tokenizer
    settings = LimitSettings.from_env(Env({"ROUTER_BUDGET_USD_PER_DAY": "0.5"}))
    limiter = limiter_on(MemoryLimitStore(), settings, ManualClock(START_MS), table, TOKENIZERS)
    text = "東京都の天気は晴れです。" * 3000
    request = pb.CompleteRequest(
        model="auto",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=256,
    )
    own = count_prompt(request, TOKENIZERS.for_spec(small))
    assert own > count_prompt(request, TOKENIZERS.for_spec(large))
    small_bill = most_billed(small, 256, own)
    tickets = await asyncio.gather(*(limiter.admit("t", request) for _ in range(20)))
    admitted = [t for t in tickets if isinstance(t, Ticket)]
    assert admitted[0].hold is not None and admitted[0].hold.nanos == small_bill == 79_286_000
    for ticket in admitted:
        _answered(limiter, ticket, small_bill)
    await limiter.drain()
    spent = small_bill * len(admitted)
    print(f"{len(admitted)} of 20 admitted, spent {spent:,} of 500,000,000 nanos")
    assert spent <= 500_000_000 + small_bill  # past the budget by one bill at most
    await limiter.close()
