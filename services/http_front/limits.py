"""How many requests of one tenant the front has in flight at once; one more gets 429. All of
a tenant's API keys count together (``HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY`` keeps its name).
And how many bytes of request bodies the front holds while it reads them, all tenants
together (``BodyBudget``, ``HTTP_FRONT_BODY_BUDGET_BYTES``)."""

from __future__ import annotations

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


class BodyFull(Exception):
    """No room for a body's bytes in the front's ``BodyBudget`` (or its tenant's share)."""


class BodyBudget:
    """The bytes of request bodies the front holds while it reads them, all tenants together:
    at most ``limit`` (``HTTP_FRONT_BODY_BUDGET_BYTES``), and one tenant's bodies at most
    ``tenant_limit``. A body takes its bytes as they arrive, never before (a declared
    ``Content-Length`` is only checked against the room there is now): an upload whose bytes
    have not come holds nothing, however long it declares itself. No room for a body's next
    chunk (or its declared length): ``BodyFull``, at once, without waiting (a body holding
    bytes must not wait on others holding theirs; the caller's refusal says retry). What a
    body took is given back once it is parsed (``Reading.close``), or dropped."""

    def __init__(self, limit: int, tenant_limit: int, gauge: LoopCounter | None = None) -> None:
        """``gauge``: set to the bytes taken at each change (the front's metric)."""
        self._limit = limit
        self._tenant_limit = min(tenant_limit, limit)
        self._used = 0
        self._by_tenant: dict[str, int] = {}
        self._gauge = gauge

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def tenant_limit(self) -> int:
        return self._tenant_limit

    @property
    def used(self) -> int:
        """Bytes taken by the bodies being read now."""
        return self._used

    def used_by(self, tenant: str) -> int:
        return self._by_tenant.get(tenant, 0)

    def room(self, tenant: str) -> int:
        """The bytes ``tenant``'s bodies may take now."""
        return min(self._limit - self._used, self._tenant_limit - self.used_by(tenant))

    @contextmanager
    def reading(self, tenant: str) -> Iterator[Reading]:
        """One body of ``tenant``'s: all that it took given back at the end of the block."""
        held = Reading(self, tenant)
        try:
            yield held
        finally:
            held.close()

    def take_now(self, size: int, tenant: str) -> bool:
        """Takes ``size`` bytes for ``tenant`` if they fit now; else False."""
        if size > self.room(tenant):
            return False
        self._add(size, tenant)
        return True

    def give(self, size: int, tenant: str) -> None:
        self._add(-size, tenant)

    def _add(self, size: int, tenant: str) -> None:
        self._used += size
        left = self.used_by(tenant) + size
        if left:
            self._by_tenant[tenant] = left
        else:
            self._by_tenant.pop(tenant, None)
        if self._gauge is not None:
            self._gauge.set(self._used)


class Reading:
    """The bytes one body has taken of its ``BodyBudget``."""

    def __init__(self, budget: BodyBudget, tenant: str) -> None:
        self._budget = budget
        self._tenant = tenant
        self.taken = 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` bytes (a declared ``Content-Length``) would fit now: nothing is
        taken (a body that would not is refused before it is read)."""
        return size - self.taken <= self._budget.room(self._tenant)

    def cover(self, size: int) -> None:
        """Takes what ``size`` bytes read so far need beyond what was taken, without waiting;
        ``BodyFull``."""
        more = size - self.taken
        if more > 0:
            if not self._budget.take_now(more, self._tenant):
                raise BodyFull
            self.taken += more

    def close(self) -> None:
        if self.taken:
            self._budget.give(self.taken, self._tenant)
            self.taken = 0
