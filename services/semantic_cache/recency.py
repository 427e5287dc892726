"""When the L1 entries were last used, and which one goes when the cache is over capacity.

The capacity is shared max-min fairly between tenants, LRU within each: the entry evicted is
the least recently used one of the tenant holding the most entries (of several holding as
many, the one whose least recently used entry was used least recently). A tenant holding
fewer entries than another never loses one while that other holds more, so one tenant's flood
of new questions evicts its own older answers, not another tenant's; with one tenant, or
tenants that hold as many, it is plain LRU. The byte bound is shared by the same rule in
bytes (``victim_by_bytes``, ``within_level``).

Each tenant's entries are kept in their own LRU order, each with a tick (a count of stores and
hits so far) that also gives the order across tenants: the snapshot's order, which a restore
loads back, so the restored cache evicts as the original would. The tenants are ranked by
(-entries, tick of their least recently used) in a heap, and by (-bytes, that tick) in
another, a tenant pushed again whenever its key changes (a store, a removal, a hit on its
least recently used entry) and its outdated items skipped when they come up and dropped when
a heap holds over four a tenant (and 1,024 more): choosing a victim and each change cost
O(log T) for T tenants holding entries (reading every tenant cost 11 ms an eviction at
10,000). Not thread-safe: the event loop's.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import chain

import numpy as np
import numpy.typing as npt

from services.semantic_cache.levels import Levels

Ranked = tuple[int, int, str]  # (-size, tick of the tenant's least recently used, tenant)


class Recency:
    def __init__(self) -> None:
        self._tenants: dict[str, OrderedDict[int, int]] = {}  # tenant -> id -> tick, LRU first
        self._bytes: dict[str, int] = {}  # tenant -> what its entries hold
        self._by_entries: list[Ranked] = []  # heap; may hold outdated items
        self._by_bytes: list[Ranked] = []  # heap; may hold outdated items
        self._levels = Levels()  # the tenants' bytes, as of the last ``within_level``
        self._synced: dict[str, int] = {}  # tenant -> its bytes in ``_levels``
        self._moved: set[str] = set()  # tenants whose bytes changed since
        self._tick = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def used(self, tenant: str, vid: int, nbytes: int = 0) -> None:
        """The entry was stored or served: it is now its tenant's most recently used.
        ``nbytes``: what a new entry holds (a served one keeps what it was stored with)."""
        lru = self._tenants.get(tenant)
        if lru is None:
            lru = self._tenants[tenant] = OrderedDict()
            self._bytes[tenant] = 0
        if vid in lru:
            first = next(iter(lru)) == vid
            lru.move_to_end(vid)
            lru[vid] = self._tick
            self._tick += 1
            if first:  # its least recently used is another entry, or this one used now
                self._rank(tenant, lru)
            return
        self._size += 1
        lru[vid] = self._tick
        self._tick += 1
        self._bytes[tenant] += nbytes
        self._moved.add(tenant)
        self._rank(tenant, lru)

    def holds(self, tenant: str) -> bool:
        """Whether the tenant has an entry."""
        return tenant in self._tenants

    def forget(self, tenant: str, vid: int, nbytes: int = 0) -> None:
        """The entry is gone; ``nbytes``: what it held (as given to ``used``)."""
        lru = self._tenants.get(tenant)
        if lru is None or lru.pop(vid, None) is None:
            return
        self._size -= 1
        self._moved.add(tenant)
        if not lru:
            del self._tenants[tenant], self._bytes[tenant]
            return
        self._bytes[tenant] -= nbytes
        self._rank(tenant, lru)

    def _rank(self, tenant: str, lru: OrderedDict[int, int]) -> None:
        """Pushes the tenant's current keys; rebuilds a heap mostly outdated."""
        oldest = next(iter(lru.values()))
        heapq.heappush(self._by_entries, (-len(lru), oldest, tenant))
        heapq.heappush(self._by_bytes, (-self._bytes[tenant], oldest, tenant))
        if len(self._by_entries) > 4 * len(self._tenants) + 1024:
            self._by_entries = [
                (-len(d), next(iter(d.values())), t) for t, d in self._tenants.items()
            ]
            heapq.heapify(self._by_entries)
        if len(self._by_bytes) > 4 * len(self._tenants) + 1024:
            self._by_bytes = [
                (-self._bytes[t], next(iter(d.values())), t) for t, d in self._tenants.items()
            ]
            heapq.heapify(self._by_bytes)

    def victim(self, sizes: Mapping[str, int] | None = None) -> int:
        """The id of the entry to evict: the least recently used of the tenant holding the most
        entries. Given ``sizes`` (tenant -> what it holds, e.g. bytes) it ranks by those, but
        reads every tenant, O(T): the byte bound's ``victim_by_bytes`` is kept as it goes."""
        if sizes is None:
            return self._top(self._by_entries, lambda t, lru: len(lru))
        best: tuple[int, int] | None = None  # (-size, tick of its least recently used)
        chosen = -1
        for tenant, lru in self._tenants.items():
            vid, tick = next(iter(lru.items()))
            size = sizes.get(tenant, 0)
            if best is None or (-size, tick) < best:
                best, chosen = (-size, tick), vid
        if best is None:
            raise LookupError("no entries")
        return chosen

    def victim_by_bytes(self) -> int:
        """The least recently used entry of the tenant holding the most bytes (``nbytes``)."""
        return self._top(self._by_bytes, lambda t, lru: self._bytes[t])

    def _top(self, heap: list[Ranked], size: Callable[[str, OrderedDict[int, int]], int]) -> int:
        while heap:
            negative, tick, tenant = heap[0]
            lru = self._tenants.get(tenant)
            if lru is not None and -negative == size(tenant, lru):
                vid, oldest = next(iter(lru.items()))
                if oldest == tick:
                    return vid
            heapq.heappop(heap)  # outdated: the tenant was pushed again with its new key
        raise LookupError("no entries")

    def within_level(self, tenant: str, size: int, bound: int) -> bool:
        """Whether a new entry of ``size`` bytes of the tenant is within the level L the byte
        ``bound`` leaves each tenant when shared max-min fairly (the holdings, the tenant's
        with the entry, each cut at L fill the bound). That is whether the holdings cut at
        ``size`` fit: sum(min(h, size)) <= bound, the tenant's own, holding the entry, cut at
        ``size`` itself. O(log V) (``Levels``), for each tenant whose bytes changed since."""
        for moved in self._moved:
            held = self._bytes.get(moved, 0)
            self._levels.move(self._synced.pop(moved, 0), held)
            if held:
                self._synced[moved] = held
        self._moved.clear()
        others = self._levels.cut_at(size) - min(self._bytes.get(tenant, 0), size)
        return others + size <= bound

    def order(self) -> npt.NDArray[np.int64]:
        """Every id, least recently used first across all tenants."""
        lrus = self._tenants.values()
        ids = np.fromiter(chain.from_iterable(lrus), np.int64, self._size)
        ticks = np.fromiter(chain.from_iterable(d.values() for d in lrus), np.int64, self._size)
        order: npt.NDArray[np.int64] = ids[np.argsort(ticks, kind="stable")]
        return order
