"""The sum of min(held, level) over the tenants' holdings, for any level, in O(log V).

The byte bound's fair share (``EntryStore.keeps``) asks whether an entry of ``size`` bytes is
within the level L the bound leaves each tenant, which is whether the holdings cut at ``size``
still fit the bound: sum(min(h, size)) <= bound. Sorting every tenant's holding on each store
cost O(T log T) (1.3 ms at 10,000 tenants); two Fenwick trees indexed by the holding's value
(how many tenants hold each value, and what they hold together) answer it in O(log V) for
holdings below V: about 30 steps under a 1 GiB bound. The trees are dicts, sparse (a node
whose range holds nothing is dropped: at most ~log V nodes a tenant), and grow by doubling
when a holding is over their range. Not thread-safe: the event loop's.
"""

from __future__ import annotations


class Levels:
    def __init__(self) -> None:
        self._size = 1  # a power of two: the nodes are 1..size, holdings up to it
        self._count: dict[int, int] = {}  # node -> holdings in its range
        self._sum: dict[int, int] = {}  # node -> what they hold together
        self._tenants = 0  # holdings over 0
        self._total = 0

    def move(self, old: int, new: int) -> None:
        """One tenant's holding went from ``old`` to ``new`` (0: it holds nothing)."""
        if old == new:
            return
        if old > 0:
            self._add(old, -1)
        if new > 0:
            while new > self._size:  # the new root covers the old range: all held so far
                self._size *= 2
                if self._tenants:
                    self._count[self._size] = self._tenants
                    self._sum[self._size] = self._total
            self._add(new, 1)

    def _add(self, value: int, sign: int) -> None:
        self._tenants += sign
        self._total += sign * value
        count, total, i = self._count, self._sum, value
        while i <= self._size:
            left = count.get(i, 0) + sign
            if left:
                count[i] = left
                total[i] = total.get(i, 0) + sign * value
            else:
                del count[i], total[i]
            i += i & -i

    def cut_at(self, level: int) -> int:
        """sum(min(h, level)) over the holdings."""
        if level <= 0:
            return 0
        below = below_sum = 0  # of the holdings < level
        count, total, i = self._count, self._sum, min(level - 1, self._size)
        while i > 0:
            below += count.get(i, 0)
            below_sum += total.get(i, 0)
            i -= i & -i
        return below_sum + level * (self._tenants - below)
