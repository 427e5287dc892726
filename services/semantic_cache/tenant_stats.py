"""Per-tenant L1 counts since the process started: lookups that read the cache, their hits
(and the exact ones), answers stored. What the Admin API's stats report beside the entries,
one page of tenants at a time (``stats_page``)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

# A Stats page (L1StatsRequest.page_size): at most this many rows, the router's Admin page
STATS_PAGE_MAX = 1000
# ... and fewer once their names pass this many bytes (at least one row): a name kept by an
# older version may be 1 MB, and a page must stay far below gRPC's 4 MiB message limit
STATS_PAGE_NAME_BYTES = 1 << 20


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


def stats_page(tenants: Iterable[str], after: str, size: int) -> tuple[list[str], bool]:
    """The first ``size`` of ``tenants`` by name after ``after`` ("" = from the first), fewer
    once their names pass ``STATS_PAGE_NAME_BYTES`` (at least one), and whether more follow.
    O(tenants log size): no sort of every tenant, no row built but the page's."""
    first = heapq.nsmallest(size + 1, (t for t in tenants if t > after))
    chosen: list[str] = []
    name_bytes = 0
    for name in first[:size]:
        name_bytes += len(name.encode("utf-8", "surrogatepass"))
        if chosen and name_bytes > STATS_PAGE_NAME_BYTES:
            break
        chosen.append(name)
    return chosen, len(first) > len(chosen)
