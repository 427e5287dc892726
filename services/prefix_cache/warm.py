"""Which prefixes are warm: entries keyed by (scope, prefix digest) with an absolute expiry.

A scope isolates caches: ``(tenant, model)`` for the provider's prompt cache, and
``(tenant, model, replica)`` for the approximate view of a replica's KV cache. Expiry is
``expires_at_ms`` computed from the caller's clock and stored with the entry (a Redis store
would use key expiry only to collect garbage).

The protocol is shaped for an atomic remote implementation: ``settle`` is one round trip that
finds the longest warm probe, refreshes it, and writes the new entries (a Redis Lua script over
``KEYS = probes + writes``), so two concurrent commits never read a half-written state.

The provider looks its cache up when the request arrives, not at its first token: ``settle``
judges the probes live at ``read_at_ms`` (the Plan's time) while it refreshes and writes at
``now_ms``. An expired entry is therefore kept ``READ_GRACE_MS`` longer (in memory before it is
purged, in Redis before key expiry collects it), and the read is judged no earlier than that
before ``now_ms`` (``read_time``).

An entry's lifetime is measured from the start of the request that writes or reads it, not
from its first token (Anthropic's rule): a refresh or write made at ``now_ms`` expires at
``started_ms`` (the request's arrival) + its ttl, never earlier than the entry already did.
The entry exists (is readable) only from ``now_ms``, the first token of the request that wrote
it (``created_at_ms``, kept by refreshes while it stays live): a request that arrived before
that (``started_ms``) does not read it, as the provider looked its cache up before it existed.
That is judged with the judging process's own clock, which may be behind the writer's (another
replica sharing Redis) or stepped back since the write: an entry created later than the judging
clock's ``now_ms`` is read (``created_after``), as no request can have arrived before it in any
honest sense; the guard holds where the clocks agree.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.holdings import TenantOrder
from services.prefix_cache.rules import Probe, Write

Scope = tuple[str, ...]

# How long after its expiry an entry is still held, so that a request which arrived while it was
# live reads it at its first token up to this much later (prefill and queueing are seconds).
READ_GRACE_MS = 60_000


def read_time(arrived_ms: int | None, now_ms: int) -> int:
    """When a WARM's probes are judged live: at the request's arrival (its Plan), within
    ``READ_GRACE_MS`` before ``now_ms``; at ``now_ms`` when the arrival is unknown."""
    if arrived_ms is None:
        return now_ms
    return max(min(arrived_ms, now_ms), now_ms - READ_GRACE_MS)


def start_time(started_ms: int | None, now_ms: int) -> int:
    """When a WARM's refresh and writes start their lifetime: the request's start (its Plan),
    never after ``now_ms``; ``now_ms`` when the start is unknown."""
    return now_ms if started_ms is None else min(started_ms, now_ms)


@dataclass(frozen=True)
class WarmEntry:
    digest: str
    tokens: int
    ttl_ms: int
    expires_at_ms: int
    # when it became readable: its writer's first token (0: since always, as an entry written
    # by an older version, which did not keep it, is taken)
    created_at_ms: int = 0


def created_after(entry: WarmEntry, arrived_ms: int, now_ms: int) -> bool:
    """Whether ``entry`` was created after a request's arrival, so it is no read for it: its
    first-readable time is past the arrival and no later than the judging clock's ``now_ms``.
    One created later than that now was written by a process whose clock is ahead (another
    replica sharing Redis) or before this clock stepped back: it cannot have been created after
    the arrival in any honest sense, and is read rather than billed as a phantom write."""
    return arrived_ms < entry.created_at_ms <= now_ms


class WarmStore(Protocol):
    async def count(self) -> int:
        """Entries held, live or not yet collected (the in-memory gauge, and tests)."""
        ...

    async def longest(self, scope: Scope, probes: Sequence[Probe], now_ms: int) -> WarmEntry | None:
        """The longest unexpired entry among ``probes``. No side effects."""
        ...

    async def settle(
        self,
        scope: Scope,
        probes: Sequence[Probe],
        writes: Sequence[Write],
        now_ms: int,
        read_at_ms: int | None = None,
        started_ms: int | None = None,
    ) -> WarmEntry | None:
        """Atomically: find the longest probe unexpired at ``read_at_ms`` (the request's
        arrival, ``read_time``; None = ``now_ms``) and not created after ``started_ms`` (the
        request's start, its arrival, ``start_time``; None = ``now_ms``: an entry written after
        it and by ``now_ms`` is not read, ``created_after``), refresh it to ``started_ms`` +
        its ttl, then create (readable from ``now_ms``) or refresh every write likewise; a
        refresh never moves an expiry earlier. Returns the hit as found before any change
        (None when nothing was warm)."""
        ...


Key = tuple[Scope, str]


class InMemoryWarmStore:
    """The single-process default: entries expired for ``READ_GRACE_MS`` are purged by time as
    writes pass, whatever their place in the recency order (a live 1-hour entry touched long
    ago does not hold back the expired 5-minute ones touched after it); then, over
    ``max_entries`` live ones, the least recently touched entry of the tenant (a scope's first
    element) holding the most is evicted: the bound, one for all tenants, is shared max-min
    fairly (``services.common.holdings``), so one tenant's flood of distinct prompts pushes
    out its own entries, never those of a tenant holding fewer (whose next turn would pay a
    write instead of a read); alone, a tenant has the whole bound.

    Expiry is a min-heap of ``(expires_at_ms, key)``, one item per key, pushed when the key is
    created: a refresh (which only moves the expiry later) pushes nothing; the item, popped at
    its time, is pushed again at the entry's later expiry. Items of keys evicted for the bound
    are dropped as they surface, and the heap is rebuilt once it holds over twice the entries."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._entries: dict[Key, WarmEntry] = {}
        self._touched: TenantOrder[Key] = TenantOrder()  # each tenant's keys, LRU first
        self._expiry: list[tuple[int, Key]] = []

    def __len__(self) -> int:
        return len(self._entries)

    async def count(self) -> int:
        """Entries held, live or not yet purged (for tests and stats)."""
        return len(self._entries)

    async def longest(self, scope: Scope, probes: Sequence[Probe], now_ms: int) -> WarmEntry | None:
        return self._find(scope, probes, now_ms)

    async def settle(
        self,
        scope: Scope,
        probes: Sequence[Probe],
        writes: Sequence[Write],
        now_ms: int,
        read_at_ms: int | None = None,
        started_ms: int | None = None,
    ) -> WarmEntry | None:
        start = start_time(started_ms, now_ms)
        live_at = now_ms if read_at_ms is None else read_at_ms
        hit = self._find(scope, probes, live_at, (start, now_ms))
        if hit is not None:
            expires = max(hit.expires_at_ms, start + hit.ttl_ms)
            self._put(scope, hit.digest, hit.tokens, hit.ttl_ms, expires, hit.created_at_ms)
        for write in writes:
            ttl_ms, expires, created = write.ttl_ms, start + write.ttl_ms, now_ms
            old = self._live(scope, write.digest, now_ms)
            if old is not None:  # refreshing never shortens a longer-lived entry
                ttl_ms, expires = max(ttl_ms, old.ttl_ms), max(expires, old.expires_at_ms)
                created = min(created, old.created_at_ms)
            self._put(scope, write.digest, write.tokens, ttl_ms, expires, created)
        self._purge(now_ms)
        return hit

    def _live(self, scope: Scope, digest: str, now_ms: int) -> WarmEntry | None:
        entry = self._entries.get((scope, digest))
        return entry if entry is not None and entry.expires_at_ms > now_ms else None

    def _find(
        self,
        scope: Scope,
        probes: Sequence[Probe],
        live_at_ms: int,
        arrived: tuple[int, int] | None = None,
    ) -> WarmEntry | None:
        """The longest entry live at ``live_at_ms`` and readable by a request that arrived at
        ``arrived`` = (arrival, judging clock's now) (None: any; ``created_after``)."""
        best: WarmEntry | None = None
        for probe in probes:
            entry = self._live(scope, probe.digest, live_at_ms)
            if entry is None or (arrived is not None and created_after(entry, *arrived)):
                continue
            if best is None or entry.tokens > best.tokens:
                best = entry
        return best

    def _put(
        self, scope: Scope, digest: str, tokens: int, ttl_ms: int, expires: int, created: int
    ) -> None:
        key = (scope, digest)
        old = self._entries.get(key)
        self._entries[key] = WarmEntry(digest, tokens, ttl_ms, expires, created)
        self._touched.put(_tenant(scope), key)
        if old is None or expires < old.expires_at_ms:  # earlier only if the clock went back
            heapq.heappush(self._expiry, (expires, key))

    def _drop(self, key: Key) -> None:
        del self._entries[key]
        self._touched.remove(_tenant(key[0]), key)

    def _purge(self, now_ms: int) -> None:
        # by time first: every entry past its expiry and the grace (a late first token reads
        # it) goes, wherever it is in the recency order
        while self._expiry and self._expiry[0][0] + READ_GRACE_MS <= now_ms:
            _, key = heapq.heappop(self._expiry)
            entry = self._entries.get(key)
            if entry is None:  # evicted for the bound, or a second item of a key
                continue
            if entry.expires_at_ms + READ_GRACE_MS <= now_ms:
                self._drop(key)
            else:  # refreshed since: due at its new expiry
                heapq.heappush(self._expiry, (entry.expires_at_ms, key))
        # then the bound, on live entries: the least recently touched of the tenant holding most
        while len(self._entries) > self._max:
            self._drop(self._touched.next_out()[1])
        if len(self._expiry) > 2 * len(self._entries) + 64:
            self._expiry = [(e.expires_at_ms, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiry)


def _tenant(scope: Scope) -> str:
    """The tenant a scope belongs to: its first element."""
    return scope[0] if scope else ""
