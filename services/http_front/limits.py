"""How many requests of one tenant the front has in flight at once; one more gets 429. All of
a tenant's API keys count together (``HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY`` keeps its name).
And how many bytes of request bodies the front holds while it reads them, all tenants
together (``BodyBudget``, ``HTTP_FRONT_BODY_BUDGET_BYTES``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from services.common.metrics import LoopCounter
from services.http_front.errors import RATE_LIMIT_RETRY_AFTER_S, ApiError


class InFlight:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._count: dict[str, int] = {}

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        count = self._count.get(tenant, 0)
        if count >= self._limit:
            raise ApiError(
                "rate_limit",
                f"rate limit: this tenant already has {count} requests in flight on this front, "
                f"all of its API keys together (at most {self._limit}); retry when one has "
                "finished",
                retry_after_s=RATE_LIMIT_RETRY_AFTER_S,
            )
        self._count[tenant] = count + 1
        try:
            yield
        finally:
            left = self._count[tenant] - 1
            if left:
                self._count[tenant] = left
            else:
                del self._count[tenant]

    def in_flight(self, tenant: str) -> int:
        return self._count.get(tenant, 0)


# how long a body waits for room in the ``BodyBudget`` before it is refused (a retry, which
# both SDKs make after ``retry-after``, tries again): short, since a waiting connection is one
# more open, and its caller's bytes wait in the socket's buffers
BODY_WAIT_S = 1.0


class BodyFull(Exception):
    """No room for a body's bytes in the front's ``BodyBudget`` (within the wait it had)."""


class BodyBudget:
    """The bytes of request bodies the front holds while it reads them, all tenants together:
    at most ``limit`` (``HTTP_FRONT_BODY_BUDGET_BYTES``). A body takes its declared
    ``Content-Length`` before its first byte is read, waiting its turn (first come, first
    served) up to a short wait; a body without one (chunked) or that grows past it
    (decompressed) takes each further chunk as it comes, without waiting (and, bodies
    waiting, without going before them: a body holding bytes is refused rather than wait on
    others holding theirs). No room:
    ``BodyFull`` (the caller's refusal says retry). What a body took is given back once it
    is parsed (``Reading.close``), or dropped."""

    def __init__(self, limit: int, gauge: LoopCounter | None = None) -> None:
        """``gauge``: set to the bytes taken at each change (the front's metric)."""
        self._limit = limit
        self._used = 0
        self._gauge = gauge
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def used(self) -> int:
        """Bytes taken by the bodies being read now."""
        return self._used

    @contextmanager
    def reading(self) -> Iterator[Reading]:
        """One body's bytes: all that it took given back at the end of the block."""
        held = Reading(self)
        try:
            yield held
        finally:
            held.close()

    def take_now(self, size: int) -> bool:
        """Takes ``size`` bytes if they fit now and no body waits before; else False."""
        if self._waiting or self._used + size > self._limit:
            return False
        self._add(size)
        return True

    async def take(self, size: int, wait_s: float) -> None:
        """Takes ``size`` bytes, waiting up to ``wait_s`` for room after the bodies already
        waiting; ``BodyFull`` when none came."""
        if self.take_now(size):
            return
        if wait_s <= 0 or size > self._limit:
            raise BodyFull
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        granted = entry[1]
        try:
            async with asyncio.timeout(wait_s):
                await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self.give(size)  # granted as the wait ended: given back, as if not
            else:
                granted.cancel()
                if entry in self._waiting:  # else ``_grant`` dropped it, as cancelled
                    self._waiting.remove(entry)
                self._grant()  # the one behind it may fit
            if isinstance(exc, TimeoutError):
                raise BodyFull from None
            raise

    def give(self, size: int) -> None:
        self._add(-size)
        self._grant()

    def _add(self, size: int) -> None:
        self._used += size
        if self._gauge is not None:
            self._gauge.set(self._used)

    def _grant(self) -> None:
        """Wakes the waiting bodies, first come first, while the first one fits."""
        while self._waiting:
            size, granted = self._waiting[0]
            if granted.done():  # cancelled: dropped here (its waiter finds it gone)
                self._waiting.popleft()
                continue
            if self._used + size > self._limit:
                return
            self._waiting.popleft()
            self._add(size)
            granted.set_result(None)


class Reading:
    """The bytes one body has taken of its ``BodyBudget``."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.taken = 0

    async def reserve(self, size: int, wait_s: float) -> None:
        """Takes ``size`` bytes (a declared ``Content-Length``), waiting up to ``wait_s`` for
        room; ``BodyFull`` when none came."""
        if size > 0:
            await self._budget.take(size, wait_s)
            self.taken += size

    def cover(self, size: int) -> None:
        """Takes what ``size`` bytes read so far need beyond what was taken, without waiting
        (a body holding bytes must not wait on others holding theirs); ``BodyFull``."""
        more = size - self.taken
        if more > 0:
            if not self._budget.take_now(more):
                raise BodyFull
            self.taken += more

    def close(self) -> None:
        if self.taken:
            self._budget.give(self.taken)
            self.taken = 0
