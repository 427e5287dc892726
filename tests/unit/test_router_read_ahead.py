"""The model streams read ahead of their callers (``read_ahead``) hold a bounded memory: a
call's buffer at most ``CALL_MAX_BYTES``, all calls' together the router's budget
(``ROUTER_READ_AHEAD_MAX_BYTES``) and one chunk a call, however large their ``max_tokens``
and however many callers stopped reading (20 such at max_tokens 64,000 held +811 MiB)."""

from __future__ import annotations

import asyncio

from cachemesh.v1 import model_pb2
from services.router.read_ahead import CALL_MAX_BYTES, ReadAhead, ReadAheadBudget, chunk_bytes

CHUNK = model_pb2.GenerateChunk(text=" tok")
SIZE = chunk_bytes(CHUNK)
MAX_TOKENS = 64_000


async def _endless() -> model_pb2.GenerateChunk:
    return CHUNK  # a model writing as fast as it is read


def _ahead(budget: ReadAheadBudget) -> ReadAhead:
    return ReadAhead(_endless, MAX_TOKENS, lambda: 0.0, lambda chunk, at: None, budget)


async def _settle() -> None:
    for _ in range(50):  # the reading tasks run until their bounds stop them
        await asyncio.sleep(0)


async def test_callers_that_stopped_reading_hold_the_budget_and_no_more() -> None:
    budget = ReadAheadBudget(256 * 1024)
    aheads = [_ahead(budget) for _ in range(20)]
    await _settle()
    assert budget.held == sum(ahead.held for ahead in aheads)
    assert budget.max_bytes <= budget.held <= budget.max_bytes + len(aheads) * SIZE
    assert all(ahead.held >= SIZE for ahead in aheads)  # each has its caller's next chunk
    for ahead in aheads:
        ahead.close()
    assert budget.held == 0


async def test_a_call_holds_at_most_its_own_bound() -> None:
    budget = ReadAheadBudget(64 * 1024 * 1024)
    ahead = _ahead(budget)
    await _settle()
    assert CALL_MAX_BYTES <= ahead.held <= CALL_MAX_BYTES + SIZE
    ahead.close()


async def test_a_caller_that_keeps_up_reads_on_while_others_hold_the_budget() -> None:
    budget = ReadAheadBudget(64 * 1024)
    stuck = [_ahead(budget) for _ in range(4)]
    await _settle()
    assert not budget.room
    reading = _ahead(budget)
    for _ in range(1000):
        chunk, _at = await reading.read()
        assert chunk == CHUNK
    assert reading.held <= 2 * SIZE  # read as taken, not ahead
    reading.close()
    # a stuck caller that takes its chunks frees the budget: the reading goes on, to it
    taken = len(stuck[0].left())
    for _ in range(taken):
        await stuck[0].read()
    assert budget.room
    await _settle()
    assert budget.max_bytes <= budget.held <= budget.max_bytes + len(stuck) * SIZE
    assert budget.held == sum(ahead.held for ahead in stuck)
    for ahead in stuck:
        ahead.close()
