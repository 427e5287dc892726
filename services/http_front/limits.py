"""How many requests of one tenant the front has in flight at once; one more gets 429. All of
a tenant's API keys count together (``HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY`` keeps its name)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
