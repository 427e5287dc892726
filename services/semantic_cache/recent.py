"""Bounded maps of the most recently used values: what a miss's Store reuses from its Lookup."""

from __future__ import annotations

from typing import Generic, TypeVar

from services.common.holdings import TenantOrder

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
        self._values: dict[tuple[str, K], V] = {}
        self._order: TenantOrder[K] = TenantOrder()  # each tenant's keys, LRU first

    def get(self, tenant: str, key: K) -> V | None:
        value = self._values.get((tenant, key))
        if value is not None:
            self._order.put(tenant, key)
        return value

    def put(self, tenant: str, key: K, value: V) -> None:
        self._values[(tenant, key)] = value
        self._order.put(tenant, key)
        while len(self._values) > self._size:
            out = self._order.next_out()
            del self._values[out]
            self._order.remove(*out)

    def remove(self, tenant: str, key: K) -> None:
        """Forgets ``key`` of ``tenant`` (nothing when not held)."""
        if self._values.pop((tenant, key), None) is not None:
            self._order.remove(tenant, key)

    def __len__(self) -> int:
        return len(self._values)
