"""A caller's cancel that lands as the answer ledger's claim round trip ends, on the way to the
model call: the claim's script has run in Redis (the id is claimed for this call), and

- ``cut``: the cancel cuts the reply (``CancelledError`` out of the claim, as when it lands
  while redis-py reads the reply). The call never learnt it held the claim: it stayed in Redis
  until its 10 s lease lapsed, and a repeat of the id on another router waited on a call that
  was gone. It is given back (compare-and-delete by the claim's own token).

Both for a call marked as a retry (it claims before anything else) and an unmarked one with
its own request_id (it claims once L1 missed, just before its model call), each RPC. The
ledger is a real Redis; the cancel is made by the ledger in the same loop turn as its reply,
so each case is deterministic.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from services.router.answer_ledger import Running, ledger_key
from tests.unit.test_router_answer_ledger import (
    RETRY,
    FakeContext,
    FakePipeline,
    _request,
    _router,
)

CASES = ["cut"]
METHODS = ["Complete", "StreamComplete"]
MARKS = {"marked": (RETRY,), "unmarked": ()}


async def _cancelled_at_the_claims_reply(ledger: Any, how: str) -> Any:
    """Wraps ``ledger.claim``: its caller's task is cancelled as the reply is in (not for a
    reply saying another call holds the id: that wait's own cancel is tested elsewhere)."""
    claim = ledger.claim

    async def cancelled(*args: Any, **kwargs: Any) -> Any:
        found = await claim(*args, **kwargs)
        if isinstance(found, Running):
            return found
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # the caller leaves, in the same turn as the reply came
        assert how == "cut"
        await asyncio.sleep(0)  # raises CancelledError: the reply is lost with it
        raise AssertionError("unreachable: the cancel is thrown in")

    ledger.claim = cancelled
    return ledger


async def _call(servicer: Any, method: str, mark: tuple[tuple[str, str], ...]) -> Any:
    if method == "Complete":
        return await servicer.Complete(_request(), FakeContext(*mark))
    return [chunk async for chunk in servicer.StreamComplete(_request(), FakeContext(*mark))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("marked", list(MARKS))
@pytest.mark.parametrize("how", CASES)
async def test_a_call_cancelled_as_its_claims_reply_comes_ends_there_and_leaves_no_claim(
    redis_url: str, method: str, marked: str, how: str
) -> None:
    """Before: ``cut`` left the claim held for its lease (the key's TTL ~10,000 ms after the
    call ended). Now: the id is free for a repeat at once."""
    client = Redis.from_url(redis_url)
    await client.flushdb()
    pipeline = FakePipeline()
    servicer, _, ledger = _router(redis_url, pipeline=pipeline)
    await _cancelled_at_the_claims_reply(ledger, how)
    try:
        call = asyncio.ensure_future(_call(servicer, method, MARKS[marked]))
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.gather(*servicer._background)  # a claim given back, after the call
        assert pipeline.runs == 0, "the call went on to its model call after its cancel"
        assert call.cancelled()
        key = ledger_key("tenant-a", "req-1")
        assert not await client.exists(key), (
            f"the claim is still held, for {await client.pttl(key)} ms more"
        )
    finally:
        await client.aclose()
        await ledger.close()
