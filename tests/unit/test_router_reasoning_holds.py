"""A reasoning row that bills its chain of thought outside ``max_tokens`` (DeepSeek's
deepseek-reasoner, R1; SiliconFlow's reasoning endpoints: ``thinks_outside_max_tokens`` in
models.toml) holds, of its tenant's budgets, what it can really bill: its prompt and the row's
``max_output_tokens``, not the request's ``max_tokens``. Before, R1's 405 output tokens (400
of them thinking) at ``max_tokens`` 16 billed 249,000 nanos against the 15,600 its request
held, and the requests in flight at once each passed the budget by that much. A row without
the flag holds as it did. Both stores, as test_router_budget_holds."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import AUTO, ModelTable, load_model_table
from services.common.tokens import load_tokenizers
from services.router.limit_denials import Denial
from services.router.limit_store import LimitStore
from services.router.limit_tickets import Ticket
from services.router.limit_wiring import limiter_on
from services.router.memory_limits import MemoryLimitStore
from services.router.redis_limits import RedisLimitStore
from tests.unit.gateway_support import patient_limit_settings
from tests.unit.test_router_budget_holds import START_MS, _answered

BASE = load_model_table()
R1 = "gpt-4o-mini"  # its prices (150 / 600 nanos a token in / out), thinking outside max_tokens
BUDGET_NANOS = 1_000_000  # $0.001 a day
R1_BILL = 40 * 150 + 405 * 600  # 249,000: R1's 405 output tokens, 400 of them thinking


def _table(*, flagged: bool) -> ModelTable:
    rows = dict(BASE.models)
    rows[R1] = rows[R1].model_copy(update={"thinks_outside_max_tokens": flagged})
    return BASE.model_copy(update={"models": rows})


@pytest.fixture
def store(redis_client: Redis | None) -> LimitStore:
    if redis_client is None:
        return MemoryLimitStore()
    return RedisLimitStore(redis_client, server_time=False)


def _request(i: int, model: str = R1, max_tokens: int = 16) -> pb.CompleteRequest:
    text = f"Think hard about question {i}"
    return pb.CompleteRequest(
        model=model,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
    )


_BUDGET = {"ROUTER_BUDGET_USD_PER_DAY": "0.001"}  # $0.001 a day


async def _race(store: LimitStore, table: ModelTable, n: int) -> tuple[list[Ticket], int]:
    """``n`` R1 requests admitted at once against the $0.001 budget, each billed 249,000:
    the admitted tickets and what they spent."""
    settings = patient_limit_settings(_BUDGET)
    tokenizers = load_tokenizers(table.models.values())
    limiter = limiter_on(store, settings, ManualClock(START_MS), table, tokenizers)
    results = await asyncio.gather(*(limiter.admit("t", _request(i)) for i in range(n)))
    admitted = [r for r in results if isinstance(r, Ticket)]
    for ticket in admitted:
        _answered(limiter, ticket, R1_BILL)
    await limiter.drain()
    await limiter.close()
    return admitted, R1_BILL * len(admitted)


async def test_a_row_thinking_outside_max_tokens_holds_its_max_output_tokens(
    store: LimitStore,
) -> None:
    admitted, spent = await _race(store, _table(flagged=True), 20)
    (first, *_) = admitted
    assert first.hold is not None
    spec = _table(flagged=True).models[R1]
    print(f"\nheld {first.hold.nanos:,}; {len(admitted)} of 20 admitted, spent {spent:,}")
    # its prompt and the row's max_output_tokens (16,384) at the output price
    assert first.hold.nanos >= spec.max_output_tokens * spec.output_nanos > R1_BILL
    assert len(admitted) == 1  # was 20 of 20 (10,950 held each), 4,980,000 spent: 5x it
    assert spent <= BUDGET_NANOS + first.hold.nanos


async def test_a_row_without_the_flag_holds_its_max_tokens_as_before(store: LimitStore) -> None:
    admitted, _ = await _race(store, _table(flagged=False), 3)
    assert len(admitted) == 3
    assert admitted[0].hold is not None
    assert admitted[0].hold.nanos < 16 * 600 + 100 * 150  # its max_tokens, not 16,384


def test_auto_holds_a_tier_that_thinks_outside_max_tokens() -> None:
    """``auto`` held its largest tier's largest bill: a tier thinking outside ``max_tokens``
    may bill more than that, and is held so."""
    rows = dict(BASE.models)
    small = BASE.auto["small"]
    rows[small] = rows[small].model_copy(update={"thinks_outside_max_tokens": True})
    table = BASE.model_copy(update={"models": rows})
    settings = patient_limit_settings(_BUDGET)
    tokenizers = load_tokenizers(table.models.values())

    async def hold(table: ModelTable) -> int:
        limiter = limiter_on(MemoryLimitStore(), settings, ManualClock(START_MS), table, tokenizers)
        ticket = await limiter.admit("t", _request(0, AUTO))
        assert isinstance(ticket, Ticket) and ticket.hold is not None
        await limiter.close()
        return ticket.hold.nanos

    flagged, plain = asyncio.run(hold(table)), asyncio.run(hold(BASE))
    spec = table.models[small]
    assert flagged >= spec.max_output_tokens * spec.output_nanos > plain


async def _token_race(store: LimitStore, table: ModelTable, n: int) -> list[Ticket | Denial]:
    """``n`` R1 requests admitted at once under a token rate of 2,000 a minute alone."""
    settings = patient_limit_settings({"ROUTER_LIMIT_TOKENS_PER_MIN": "2000"})
    tokenizers = load_tokenizers(table.models.values())
    limiter = limiter_on(store, settings, ManualClock(START_MS), table, tokenizers)
    results = await asyncio.gather(*(limiter.admit("t", _request(i)) for i in range(n)))
    await limiter.close()
    return list(results)


async def test_a_row_thinking_outside_max_tokens_reserves_its_max_output_tokens(
    store: LimitStore,
) -> None:
    """The token rate reserves what the request can write, as the budget holds it: before,
    its prompt and max_tokens (25 tokens), and 20 of 20 R1 requests were admitted under a
    rate of 2,000 tokens a minute, ~8,300 tokens landing (405 output each)."""
    results = await _token_race(store, _table(flagged=True), 20)
    admitted = [r for r in results if isinstance(r, Ticket)]
    spec = _table(flagged=True).models[R1]
    print(f"\n{len(admitted)} of 20 admitted, reserved {admitted[0].reserved_tokens:,}")
    assert admitted[0].reserved_tokens > spec.max_output_tokens
    assert len(admitted) == 1  # was 20: a reservation past a minute's waits for all of it
    (denial, *_) = [r for r in results if isinstance(r, Denial)]
    assert f"the {spec.max_output_tokens} output tokens its model can write" in denial.message


async def test_a_row_without_the_flag_reserves_its_max_tokens_as_before(
    store: LimitStore,
) -> None:
    results = await _token_race(store, _table(flagged=False), 20)
    admitted = [r for r in results if isinstance(r, Ticket)]
    assert len(admitted) == 20
    assert all(ticket.reserved_tokens < 16 + 100 for ticket in admitted)  # prompt + max_tokens
