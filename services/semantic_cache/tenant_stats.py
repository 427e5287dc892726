"""Per-tenant L1 counts since the process started: lookups that read the cache, their hits
(and the exact ones), answers stored. What the Admin API's stats report beside the entries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TenantCounts:
    lookups: int = 0
    hits: int = 0
    exact_hits: int = 0
    stores: int = 0


class TenantCounters:
    def __init__(self) -> None:
        self._by_tenant: dict[str, TenantCounts] = {}

    def looked_up(self, tenant: str, *, hit: bool, exact: bool) -> None:
        counts = self._counts(tenant)
        counts.lookups += 1
        if hit:
            counts.hits += 1
            counts.exact_hits += int(exact)

    def stored(self, tenant: str) -> None:
        self._counts(tenant).stores += 1

    def get(self, tenant: str) -> TenantCounts:
        counts = self._by_tenant.get(tenant)
        return TenantCounts() if counts is None else TenantCounts(**vars(counts))

    def tenants(self) -> set[str]:
        return set(self._by_tenant)

    def _counts(self, tenant: str) -> TenantCounts:
        counts = self._by_tenant.get(tenant)
        if counts is None:
            counts = self._by_tenant[tenant] = TenantCounts()
        return counts
