"""Bounded maps of the most recently used values: what a miss's Store reuses from its Lookup."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from services.common.holdings import Holdings

K = TypeVar("K")
V = TypeVar("V")


class TenantRecent(Generic[K, V]):
    """The last ``size`` values by (tenant, key), the bound shared max-min fairly between
    tenants (``services.common.holdings``): over it, the least recently used value of the
    tenant holding the most goes, so one tenant's traffic pushes out its own values, never
    those of a tenant holding fewer; alone, a tenant has the whole bound. Not thread-safe:
    the event loop's."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._size = size
        self._tenants: dict[str, OrderedDict[K, V]] = {}  # each tenant's, LRU first
        self._held = Holdings()
        self._len = 0

    def get(self, tenant: str, key: K) -> V | None:
        values = self._tenants.get(tenant)
        if values is None:
            return None
        value = values.get(key)
        if value is not None:
            values.move_to_end(key)
        return value

    def put(self, tenant: str, key: K, value: V) -> None:
        values = self._tenants.setdefault(tenant, OrderedDict())
        if key not in values:
            self._len += 1
            self._held.add(tenant, 1)
        values[key] = value
        values.move_to_end(key)
        while self._len > self._size:
            holder = self._held.most()
            held = self._tenants[holder]
            held.popitem(last=False)
            self._len -= 1
            self._held.add(holder, -1)
            if not held:
                del self._tenants[holder]

    def __len__(self) -> int:
        return self._len
