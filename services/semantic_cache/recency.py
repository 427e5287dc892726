"""When the L1 entries were last used, and which one goes when the cache is over capacity.

The capacity is shared max-min fairly between tenants, LRU within each: the entry evicted is
the least recently used one of the tenant holding the most entries (of several holding as
many, the one whose least recently used entry was used least recently). A tenant holding
fewer entries than another never loses one while that other holds more, so one tenant's flood
of new questions evicts its own older answers, not another tenant's; with one tenant, or
tenants that hold as many, it is plain LRU.

Each tenant's entries are kept in their own LRU order, each with a tick (a count of stores and
hits so far) that also gives the order across tenants: the snapshot's order, which a restore
loads back, so the restored cache evicts as the original would. Choosing a victim reads every
tenant holding entries: O(T) for T tenants (a few hundred cost microseconds). Not thread-safe:
the event loop's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from itertools import chain

import numpy as np
import numpy.typing as npt


class Recency:
    def __init__(self) -> None:
        self._tenants: dict[str, OrderedDict[int, int]] = {}  # tenant -> id -> tick, LRU first
        self._tick = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def used(self, tenant: str, vid: int) -> None:
        """The entry was stored or served: it is now its tenant's most recently used."""
        lru = self._tenants.get(tenant)
        if lru is None:
            lru = self._tenants[tenant] = OrderedDict()
        if vid in lru:
            lru.move_to_end(vid)
        else:
            self._size += 1
        lru[vid] = self._tick
        self._tick += 1

    def forget(self, tenant: str, vid: int) -> None:
        lru = self._tenants.get(tenant)
        if lru is None or lru.pop(vid, None) is None:
            return
        self._size -= 1
        if not lru:
            del self._tenants[tenant]

    def victim(self, sizes: Mapping[str, int] | None = None) -> int:
        """The id of the entry to evict: the least recently used of the largest tenant, by
        its entries or, given ``sizes`` (tenant -> what it holds, e.g. bytes), by those."""
        best: tuple[int, int] | None = None  # (-size, tick of its least recently used)
        chosen = -1
        for tenant, lru in self._tenants.items():
            vid, tick = next(iter(lru.items()))
            size = len(lru) if sizes is None else sizes.get(tenant, 0)
            if best is None or (-size, tick) < best:
                best, chosen = (-size, tick), vid
        if best is None:
            raise LookupError("no entries")
        return chosen

    def order(self) -> npt.NDArray[np.int64]:
        """Every id, least recently used first across all tenants."""
        lrus = self._tenants.values()
        ids = np.fromiter(chain.from_iterable(lrus), np.int64, self._size)
        ticks = np.fromiter(chain.from_iterable(d.values() for d in lrus), np.int64, self._size)
        order: npt.NDArray[np.int64] = ids[np.argsort(ticks, kind="stable")]
        return order
