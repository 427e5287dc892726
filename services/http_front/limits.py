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
    ``tenant_limit``. A body with a declared ``Content-Length`` reserves it of its tenant's
    share before a byte is read (``Reading.reserve``); the front-wide budget it takes only as
    its bytes arrive (a chunked body takes both as they arrive). So a tenant's uploads past its
    share are refused at once, before they have sent anything, rather than part-way once the
    others' bytes have come (64 of a tenant's 2 MiB uploads interleaved: 16 read, 48 refused
    after 0.56-1.94 MiB each had been sent); and an upload whose bytes have not come holds
    none of the front-wide budget, however long it declares itself (one tenant's idle uploads
    block that tenant only). No room: ``BodyFull``, at once, without waiting (a body holding
    bytes must not wait on others holding theirs; the caller's refusal says retry). What a
    body took is given back once it is parsed (``Reading.close``), or dropped."""

    def __init__(self, limit: int, tenant_limit: int, gauge: LoopCounter | None = None) -> None:
        """``gauge``: set to the bytes taken front-wide at each change (the front's metric)."""
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
        """Bytes taken front-wide by the bodies being read now (those that have arrived)."""
        return self._used

    def used_by(self, tenant: str) -> int:
        """Bytes of ``tenant``'s share held now: its bodies' declared lengths, or what they
        took as it arrived when that is more."""
        return self._by_tenant.get(tenant, 0)

    def room(self, tenant: str) -> int:
        """The bytes ``tenant``'s bodies may take now, front-wide and of its share."""
        return min(self._limit - self._used, self.tenant_room(tenant))

    def tenant_room(self, tenant: str) -> int:
        """What is left of ``tenant``'s share."""
        return self._tenant_limit - self.used_by(tenant)

    @contextmanager
    def reading(self, tenant: str) -> Iterator[Reading]:
        """One body of ``tenant``'s: all that it took given back at the end of the block."""
        held = Reading(self, tenant)
        try:
            yield held
        finally:
            held.close()

    def take_now(self, front: int, share: int, tenant: str) -> bool:
        """Takes ``front`` bytes front-wide and ``share`` of ``tenant``'s share if both fit
        now; else False (nothing taken)."""
        if front > self._limit - self._used or share > self.tenant_room(tenant):
            return False
        self._add(front, share, tenant)
        return True

    def give(self, front: int, share: int, tenant: str) -> None:
        self._add(-front, -share, tenant)

    def _add(self, front: int, share: int, tenant: str) -> None:
        self._used += front
        left = self.used_by(tenant) + share
        if left:
            self._by_tenant[tenant] = left
        else:
            self._by_tenant.pop(tenant, None)
        if self._gauge is not None:
            self._gauge.set(self._used)


class Reading:
    """The bytes one body has taken of its ``BodyBudget``: ``taken`` front-wide (what has
    arrived), ``held`` of its tenant's share (its declared length, or ``taken`` when more)."""

    def __init__(self, budget: BodyBudget, tenant: str) -> None:
        self._budget = budget
        self._tenant = tenant
        self.taken = 0
        self.held = 0

    def reserve(self, size: int) -> None:
        """Holds ``size`` bytes (a declared ``Content-Length``) of the tenant's share before the
        body is read, nothing front-wide; ``BodyFull`` when the share has no room for them."""
        more = size - self.held
        if more > 0:
            if not self._budget.take_now(0, more, self._tenant):
                raise BodyFull
            self.held += more

    def cover(self, size: int) -> None:
        """Takes what ``size`` bytes read so far need beyond what was taken, front-wide, and of
        the tenant's share beyond what it holds, without waiting; ``BodyFull``."""
        front = size - self.taken
        if front > 0:
            share = max(0, size - self.held)
            if not self._budget.take_now(front, share, self._tenant):
                raise BodyFull
            self.taken += front
            self.held += share

    def close(self) -> None:
        if self.taken or self.held:
            self._budget.give(self.taken, self.held, self._tenant)
            self.taken = self.held = 0
