"""prefix-cache's Redis health loop ends at its cancel even when the Redis call it was in
swallowed it. redis-py sends each command under ``asyncio.wait_for`` (its socket timeout), and
Python 3.11's ``wait_for`` returns the inner call's outcome, dropping the cancel, when that call
ends in the same turn of the event loop as the cancel (fixed in 3.12): the loop went on PINGing
(``tests/unit/test_prefix_cache_redis_oom.py`` hung in 3 of 5 runs waiting for it; a stop
abandoned it after ``TASKS_END_S`` with an ERROR). A fake Redis stands for that call here: its
PING takes the cancel and answers as if nothing had happened."""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

from redis.asyncio import Redis

from services.prefix_cache.redis_health import RedisHealth
from tests.waits import reached

# a bound on waiting for the loop to end: a loop that honours its cancel ends at its next step
ENDS_WITHIN_S = 5.0


class _SwallowsCancel:
    """A Redis whose PING takes a cancel and answers anyway (3.11's ``wait_for`` under
    redis-py's send, when the send completes as the cancel comes)."""

    def __init__(self) -> None:
        self.pinged = asyncio.Event()
        self.pings = 0

    async def ping(self) -> bool:
        self.pings += 1
        self.pinged.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # until the cancel, which is lost here
        return True

    async def set(self, *_: object, **__: object) -> None:
        return None

    async def get(self, *_: object) -> bytes:
        return b"store"

    async def info(self, section: str) -> dict[str, object]:
        # the eviction policy's check, when the Redis first answers: one that never evicts
        return {"maxmemory": 0, "maxmemory_policy": "noeviction"}

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline()


class _Pipeline:
    """The store check's round trip (``SET NX``, ``INCR``, ``GET``): the store as it was."""

    def __init__(self) -> None:
        self._seq = 0

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    def set(self, *_: object, **__: object) -> None:
        return None

    def incr(self, *_: object) -> None:
        return None

    def get(self, *_: object) -> None:
        return None

    async def execute(self) -> list[object]:
        self._seq += 1
        return [None, self._seq, b"store"]


async def _told(serving: bool) -> None:
    pass


async def test_the_health_loop_ends_at_a_cancel_its_redis_call_swallowed() -> None:
    """Before: the loop went back to waiting for its next PING (cancel lost), the task never
    ended; now it ends cancelled at once."""
    redis = _SwallowsCancel()
    watch = RedisHealth(cast(Redis, redis), "redis://127.0.0.1:1/0", _told, timeout_s=3600)
    loop = asyncio.ensure_future(watch.run(every_s=3600))
    watch.failed()  # a call found Redis failing: a PING at once
    await reached(redis.pinged, "redis.pinged")
    loop.cancel()
    done, _ = await asyncio.wait([loop], timeout=ENDS_WITHIN_S)
    if not done:
        loop.cancel()  # the fake takes this one: not swallowed twice
    assert loop in done, "the health loop kept running after its cancel"
    assert loop.cancelled()
    assert redis.pings == 1
