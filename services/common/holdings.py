"""What each tenant holds of a table bounded for all of them, and which tenant holds the most.

A bound shared by every tenant is shared max-min fairly: over its bound, the table drops a
record of the tenant holding the most (its oldest), so one tenant's flood pushes out its own
records, not another tenant's: a tenant holding less than another never loses one while that
other holds more, and a tenant alone has the whole bound. The total stays within the bound.

``most`` reads a heap of (amount, tenant) pushed at each change, the stale ones skipped as they
reach its top: O(log T) a change for T tenants, the heap rebuilt when stale items are over half
of it. Not thread-safe: the event loop's.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar


class Holdings:
    def __init__(self) -> None:
        self._held: dict[str, int] = {}  # tenant -> amount held (> 0)
        self._heap: list[tuple[int, int, str]] = []  # (-amount, push order, tenant), some stale
        self._pushes = 0

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def add(self, tenant: str, amount: int) -> None:
        """The tenant now holds ``amount`` more (less, when negative)."""
        held = self._held.get(tenant, 0) + amount
        if held < 0:
            raise ValueError(f"a tenant cannot hold less than nothing ({held})")
        if held == 0:
            self._held.pop(tenant, None)
        else:
            self._held[tenant] = held
            heapq.heappush(self._heap, (-held, self._pushes, tenant))
            self._pushes += 1
        if len(self._heap) > 2 * len(self._held) + 64:  # drop the stale items
            self._heap = [(-held, i, tenant) for i, (tenant, held) in enumerate(self._held.items())]
            heapq.heapify(self._heap)

    def most(self) -> str:
        """The tenant holding the most (of several holding as many, one of them)."""
        while self._heap:
            amount, _, tenant = self._heap[0]
            if self._held.get(tenant) == -amount:
                return tenant
            heapq.heappop(self._heap)
        raise LookupError("no tenant holds anything")


K = TypeVar("K", bound=Hashable)


class TenantOrder(Generic[K]):
    """Each tenant's keys in order (oldest or least recently used first) with what each holds
    (``Holdings``): the one bookkeeping a table bounded for all tenants together and shared
    max-min fairly needs. ``next_out`` is the key to drop over the bound: the first of the
    tenant holding the most. Not thread-safe: the event loop's."""

    def __init__(self) -> None:
        self._keys: dict[str, OrderedDict[K, int]] = {}  # tenant -> key -> its amount
        self._held = Holdings()

    def put(self, tenant: str, key: K, amount: int = 1) -> None:
        """``key`` is the tenant's newest (moved there if held; its amount kept)."""
        keys = self._keys.setdefault(tenant, OrderedDict())
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = amount
        self._held.add(tenant, amount)

    def remove(self, tenant: str, key: K) -> None:
        keys = self._keys[tenant]
        self._held.add(tenant, -keys.pop(key))
        if not keys:
            del self._keys[tenant]

    def next_out(self) -> tuple[str, K]:
        """The first key of the tenant holding the most (LookupError: none held)."""
        tenant = self._held.most()
        return tenant, next(iter(self._keys[tenant]))
