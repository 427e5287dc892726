"""A caller's cancel that lands as the answer ledger's claim round trip ends, on the way to the
model call: the claim's script has run in Redis (the id is claimed for this call), and

- ``cut``: the cancel cuts the reply (``CancelledError`` out of the claim, as when it lands
  while redis-py reads the reply). The call never learnt it held the claim: it stayed in Redis
  until its 10 s lease lapsed, and a repeat of the id on another router waited on a call that
  was gone. It is given back (compare-and-delete by the claim's own token);
- ``dropped``: the cancel is dropped under the claim, which returns its reply (Python 3.11's
  ``asyncio.wait_for``, which redis-py sends each command under, does so when the cancel comes
  in the same turn of the event loop as the reply: ``services.common.background``). The call
  went on to its model call for a caller that had left. It ends at the claim.

Both for a call marked as a retry (it claims before anything else) and an unmarked one with
its own request_id (it claims once L1 missed, just before its model call), each RPC. The
ledger is a real Redis; the cancel is made by the ledger in the same loop turn as its reply,
so each case is deterministic.

The other Redis call on the way to the model call, the limits' admit, is made in a task of its
own that the call awaits shielded (``Limiter._ask``): a cancel its redis-py drops is not the
call's. Checked here all the same, the cancel landing at each of the turns around its reply
(with ``wait_for`` in place of that shield each of them made the model call).
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

import pytest

from cachemesh import build_request
from services.common.clock import SystemClock
from services.common.errors import Code, RequestError
from services.router import servicer as servicer_module
from services.router.answer_ledger import Claimed, RedisAnswerLedger, Running, ledger_key
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limit_store import Settlement
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from tests.redis_server import client_of
from tests.unit.test_router_answer_ledger import (
    RETRY,
    FakeContext,
    FakePipeline,
    _request,
    _router,
    _virtual_time,
)

CASES = ["cut", "dropped"]
METHODS = ["Complete", "StreamComplete"]
MARKS = {"marked": (RETRY,), "unmarked": ()}

# the answer ledger's wait: the service's 0.5 s fails open under load (the call goes on unclaimed)
PATIENT_S = 10.0


@pytest.fixture(autouse=True)
def _patient_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded test machine may take longer than the service's 0.5 s to answer."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", PATIENT_S)


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
        if how == "cut":
            await asyncio.sleep(0)  # raises CancelledError: the reply is lost with it
            raise AssertionError("unreachable: the cancel is thrown in")
        with contextlib.suppress(asyncio.CancelledError):  # thrown nothing more
            await asyncio.sleep(0)
        return found

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
    call ended); ``dropped`` made the model call (1 run) and recorded its answer, for a caller
    that had left. Now: no model call, and the id is free for a repeat at once."""
    client = client_of(redis_url)
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


class CancellingStore(MemoryLimitStore):
    """Admits (reserving the request's tokens), and has ``caller`` cancelled ``turns`` turns of
    the event loop after its reply is made (0: in the same one); records each settle's
    refund."""

    def __init__(self, turns: int) -> None:
        super().__init__()
        self.turns = turns
        self.caller: asyncio.Future[Any] | None = None
        self.refunds: list[int] = []

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        refusal = await super().admit(*args, **kwargs)
        assert self.caller is not None
        cancel: Any = self.caller.cancel
        for _ in range(self.turns):
            cancel = partial(asyncio.get_running_loop().call_soon, cancel)
        cancel()
        return refusal

    async def settle(self, done: Settlement) -> None:
        self.refunds.append(done.refund_tokens)
        await super().settle(done)


# 0: as the store's reply is made; 1: before the shield hands it over; 2: once it did, before
# the call reads it (where Python 3.11's ``wait_for`` drops a cancel); 3 would be after the
# call ended (the fake pipeline makes no await)
@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_a_call_cancelled_as_its_limits_admit_it_ends_there_and_gives_back(
    redis_url: str, turns: int
) -> None:
    store = CancellingStore(turns)
    limiter = Limiter(
        store, UniformPolicies(LimitPolicy(tokens_per_min=100_000)), SystemClock(), lambda _: 10
    )
    pipeline = FakePipeline()
    servicer, _, ledger = _router(redis_url, limits=limiter, pipeline=pipeline)
    try:
        # no request_id of its own: no claim (whose check would end it) after the admit
        anonymous = build_request("What is a KV cache?", model="sim-small")
        call = store.caller = asyncio.ensure_future(
            servicer.Complete(anonymous, FakeContext())  # type: ignore[arg-type]
        )
        await asyncio.gather(call, return_exceptions=True)
        await limiter.drain()
        assert pipeline.runs == 0 and call.cancelled()
        assert store.refunds == [10 + _request().max_tokens]  # its reservation, given back
    finally:
        await limiter.close()
        await ledger.close()


async def test_a_cancel_dropped_under_a_renewal_ends_the_claims_holder(redis_url: str) -> None:
    """The call ended: its claim's renewing task is cancelled as a renewal's reply comes, and
    redis-py's ``wait_for`` drops the cancel. Before, the holder slept and renewed again, each
    third of the lease, for as long as its claim was there (a call whose give-back failed, its
    Redis failing at that moment: until the router stopped, a repeat on another router waiting
    on a call that was gone): here 5 renewals after its cancel, until the test stopped it. Now
    it ends at the renewal."""
    slept, sleep, clock = _virtual_time(sleeps=5)
    client = client_of(redis_url)
    ledger = RedisAnswerLedger(client, ttl_s=60, lease_s=30, sleep=sleep, clock=clock)
    try:
        claimed = await ledger.claim("tenant-a", "req-d", "f" * 64)
        assert isinstance(claimed, Claimed)
        renew = ledger._renew

        async def dropping(*args: Any, **kwargs: Any) -> Any:
            ours = await renew(*args, **kwargs)
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # the call ended, in the same turn as the reply came
            with contextlib.suppress(asyncio.CancelledError):  # thrown nothing more
                await asyncio.sleep(0)
            return ours

        ledger._renew = dropping  # type: ignore[assignment]
        with pytest.raises(asyncio.CancelledError):
            await ledger.hold("tenant-a", "req-d", claimed)
        assert len(slept) == 1, f"renewed {len(slept) - 1} times after its cancel"
    finally:
        await ledger.close()


@pytest.mark.parametrize("how", ["slow", "dropped"])
async def test_a_claim_whose_reply_timed_out_is_given_back_when_its_call_fails(
    redis_url: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's script ran (the id is this call's in Redis), but its reply came after the
    ledger's timeout (``slow``), or the timeout's cancel was dropped under it (``dropped``): the
    call serves the request anew without the claim. It failed, and the claim stayed for its
    10 s lease: a retry on another router waited on it. Given back at the call's end now."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", 0.05)
    client = client_of(redis_url)
    await client.flushdb()
    pipeline = FakePipeline()
    servicer, _, ledger = _router(redis_url, pipeline=pipeline)
    claim = ledger.claim

    async def late(*args: Any, **kwargs: Any) -> Any:
        found = await claim(*args, **kwargs)
        if how == "slow":
            await asyncio.sleep(0.2)  # its reply comes after LEDGER_TIMEOUT_S
        else:  # the timeout's cancel comes, and is swallowed
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.2)
        return found

    async def failing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("before_model") is not None:
            await kwargs["before_model"]()  # the claim, just before the model call
        raise RequestError(Code.UNAVAILABLE, "every replica failed")
        yield  # a generator, as the pipeline's run

    ledger.claim = late  # type: ignore[method-assign]
    pipeline.run = failing  # type: ignore[method-assign]
    try:
        with contextlib.suppress(Exception):
            await servicer.Complete(_request(), FakeContext())  # type: ignore[arg-type]
        await asyncio.gather(*servicer._background)
        key = ledger_key("tenant-a", "req-1")
        assert not await client.exists(key), f"held for {await client.pttl(key)} ms more"
    finally:
        await client.aclose()
        await ledger.close()
