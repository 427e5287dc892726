"""The bytes of request bodies the front holds while it reads them, all requests together
(``HTTP_FRONT_BODY_BUDGET_BYTES``, ``limits.BodyBudget``). The front reads a body's JSON up to 6
times ``HTTP_FRONT_MAX_BODY_BYTES`` (12 MiB), and a body still coming held what it had sent
until ``HTTP_FRONT_BODY_TIMEOUT_S``: 80 uploads of 11 MiB (two tenants' in-flight slots) held
a front process at 976 MB, measured; under the budget's default, 205 MB (10 read, 70
refused). A body finding no room within a short wait gets the front's overload, 529 / 503
with ``retry-after``, which both SDKs retry."""

from __future__ import annotations

import asyncio

import pytest

from services.common.metrics import LoopCounter
from services.http_front.limits import BodyBudget, BodyFull

OUTCOME_S = 10.0  # how long a test waits for an outcome at most (a hang fails it)
WAIT_S = 0.05  # a budget wait in the class's tests (loop time)


# --- the budget itself -------------------------------------------------------------------------
async def test_a_body_waits_for_room_and_takes_it_when_given_back() -> None:
    gauge = LoopCounter()
    budget = BodyBudget(100, gauge)
    with budget.reading() as first:
        await first.reserve(70, WAIT_S)
        assert (budget.used, gauge.value) == (70, 70)
        with budget.reading() as second:
            waiting = asyncio.ensure_future(second.reserve(50, OUTCOME_S))
            await asyncio.sleep(0)
            assert not waiting.done() and budget.used == 70
            first.close()  # its body parsed
            await waiting
            assert (budget.used, gauge.value) == (50, 50)
    assert (budget.used, gauge.value) == (0, 0)


async def test_a_body_finding_no_room_within_its_wait_is_refused_and_leaves_no_trace() -> None:
    budget = BodyBudget(100)
    with budget.reading() as holder:
        await holder.reserve(100, WAIT_S)
        with budget.reading() as late, pytest.raises(BodyFull):
            await late.reserve(1, WAIT_S)
        assert budget.used == 100
    assert budget.used == 0
    with budget.reading() as after:  # nothing left queued: the next one takes at once
        await after.reserve(100, 0)


async def test_many_bodies_refused_at_once_each_get_their_refusal() -> None:
    """Many waits ending in one loop turn: each waiter's future is cancelled before it runs;
    the first to run dropped the others from the queue, and they failed with a ValueError
    (a 500 each), not their refusal."""
    budget = BodyBudget(100)
    with budget.reading() as holder:
        await holder.reserve(100, WAIT_S)

        async def late() -> str:
            with budget.reading() as one:
                try:
                    await one.reserve(10, WAIT_S)
                except BodyFull:
                    return "refused"
                return "taken"

        assert await asyncio.gather(*(late() for _ in range(20))) == ["refused"] * 20
        assert budget.used == 100


async def test_first_come_first_served_and_a_cancelled_wait_lets_the_next_in() -> None:
    budget = BodyBudget(100)
    order: list[str] = []

    async def body(name: str, size: int) -> None:
        with budget.reading() as one:
            await one.reserve(size, OUTCOME_S)
            order.append(name)
            await asyncio.sleep(0)

    with budget.reading() as holder:
        await holder.reserve(90, WAIT_S)
        big = asyncio.ensure_future(body("big", 60))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(body("small", 5))  # fits, but comes after a waiting one
        gone = asyncio.ensure_future(body("gone", 50))
        await asyncio.sleep(0)
        assert order == [] and budget.used == 90
        gone.cancel()  # its caller left
        holder.close()
        await asyncio.wait_for(asyncio.gather(big, small), OUTCOME_S)
    assert order == ["big", "small"]
    assert budget.used == 0


async def test_a_body_without_its_length_takes_each_chunk_without_waiting() -> None:
    """A chunked body (or one growing past its Content-Length as it is decompressed) holds
    bytes already: it is refused at once rather than wait on others holding theirs."""
    budget = BodyBudget(100)
    with budget.reading() as declared:
        await declared.reserve(40, WAIT_S)
        declared.cover(30)  # within what it took
        declared.cover(60)  # 20 more
        assert (declared.taken, budget.used) == (60, 60)
        with budget.reading() as chunked:
            chunked.cover(40)
            with pytest.raises(BodyFull):
                chunked.cover(41)
            assert budget.used == 100
    assert budget.used == 0
