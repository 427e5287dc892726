"""The entries of the L1 cache and their indexes: the state under ``SemanticCache``.

Entries live in one FAISS index per (tenant, scope). An entry's expiry is fixed when it is
stored (``Entry.expires_at_ms``: created_at + its namespace's TTL at that moment, an absolute
age that reads never extend and a later TTL change never moves); capacity is total, shared
max-min fairly between tenants and LRU within each (``recency``): over it, the least recently used
entry of the tenant holding the most goes, in entries and (``max_bytes``) in bytes (evictions
are not logged: a replay decides them again). Everything here but the purges' wait for the
journal is synchronous: the cache calls it in the sections between its awaits, so no two
coroutines interleave inside one change. Changes are written to the journal (the write-ahead
log) in that same order when one is attached, and applied once durable (the journal runs them,
in its order): a Store or a purge the log could not make durable (a full disk) is not applied,
never served nor undone by a restart.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from services.common.clock import Clock
from services.common.errors import shown
from services.semantic_cache.ann import Ids, Rows, use_threads
from services.semantic_cache.embedder import Embedder
from services.semantic_cache.index import AnnSettings, ScopeIndex
from services.semantic_cache.journal import MODEL, Applied, Journal
from services.semantic_cache.policy import NamespacePolicy
from services.semantic_cache.recency import Recency
from services.semantic_cache.records import (
    CacheContents,
    Contents,
    Entry,
    InvalidQuery,
    RestoreReport,
)
from services.semantic_cache.stats import SCOPE_BYTES, StoreStats, entry_bytes, held_bytes

ScopeKey = tuple[str, str]  # (tenant, scope)
RESTORE_CHUNK = 16_384  # rows read at once by a restore (24 MB of 384-d vectors)
# A Store whose lookup is no longer on record (pushed out by its own tenant's 4,096 later misses,
# never made, or made before a restart) is refused this long after its tenant's purge: its
# answer may predate the purge. Longer than the model calls the router (300 s) and the HTTP
# front (600 s) allow by default.
PURGE_GUARD_MS = 15 * 60 * 1000
# A tenant's last replacements kept (an entry id -> the id of the entry of the same question
# that replaced it): a Drop of a replaced id follows them to the question's current entry.
REPLACED_PER_TENANT = 4_096

T = TypeVar("T")


def take_rows(contents: Contents, rows: Ids, dim: int) -> Rows:
    """The vectors of these rows of ``contents``, in this order, read a chunk at a time."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    done = 0
    while done < len(wanted):
        start = int(wanted[done])
        stop = start + RESTORE_CHUNK
        upto = int(np.searchsorted(wanted, stop))
        chunk = contents.rows(start, min(stop, int(wanted[upto - 1]) + 1))
        out[order[done:upto]] = chunk[wanted[done:upto] - start]
        done = upto
    return out


class EntryStore:
    def __init__(
        self,
        embedder: Embedder,
        clock: Clock,
        max_entries: int,
        policy: NamespacePolicy,
        ann: AnnSettings | None,
        stats: StoreStats | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """``max_bytes``: what the entries may hold together (``stats.entry_bytes``: answers,
        questions, vectors; and ``SCOPE_BYTES`` a scope holding one); None = bounded by
        ``max_entries`` alone."""
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._embedder = embedder
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._policy = policy
        self._ann = ann  # None = every scope stays exact (flat)
        self._journal: Journal | None = None
        self._entries: dict[int, Entry] = {}  # FAISS id -> entry
        self._lru = Recency()  # which entry goes over capacity
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at_ms, id); may be stale
        self._by_entry_id: dict[str, int] = {}
        self._scopes: dict[ScopeKey, ScopeIndex] = {}
        # scope -> its entries held (not forgotten: ``_forget`` comes before ``_unindex``):
        # the first one charges the scope's SCOPE_BYTES to its tenant, the last releases them
        self._held: dict[ScopeKey, int] = {}
        self._rebuilding: list[ScopeIndex] = []  # scopes whose rebuild is not swapped in yet
        self._next_id = 0
        self._changes = 0
        self._purges: dict[str, int] = {}  # tenant -> purges so far (``drop``)
        self._purged_at_ms: dict[str, int] = {}  # tenant -> when the last one was
        # tenant -> entry id -> the id of the entry of its question that replaced it, the
        # tenant's last REPLACED_PER_TENANT, while the tenant holds an entry (``_linked``)
        self._replaced: dict[str, OrderedDict[str, str]] = {}
        self.stats = stats if stats is not None else StoreStats()  # what its metrics read

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dim(self) -> int:
        return self._embedder.dim

    @property
    def default_ttl_s(self) -> float:
        """An entry's TTL in a namespace without its own, for a tenant without its own."""
        return self._policy.ttl_s

    @property
    def embedder_version(self) -> str:
        return self._embedder.version

    @property
    def changes(self) -> int:
        """Grows on every change a snapshot would show (store, removal, a hit's recency)."""
        return self._changes

    def wait_for_indexes(self) -> None:
        """Blocks until every scope's background index build is swapped in (benchmarks)."""
        for index in self._scopes.values():
            index.wait_for_rebuild()

    def use_faiss_threads(self) -> None:
        """Sets the calling thread's FAISS threads to the configured ones: OpenMP threads are
        per thread, and a worker thread replaying the log would otherwise add to an IVF on
        every core, each add spinning them all up."""
        if self._ann is not None:
            use_threads(self._ann)

    def index_kinds(self) -> set[str]:
        """The kinds of index the scopes hold now ("flat", "ivf")."""
        return {index.kind for index in self._scopes.values()}

    def apply_store(self, entry: Entry, vector: npt.NDArray[np.float32]) -> bool:
        """Re-applies a logged store (replay after a restart); False if expired or stale.
        Either way the older answer it replaced stays replaced: an expired store must not
        bring back what it superseded."""
        now = self._clock.now_ms()
        self._purge_expired(now)
        if entry.embedder_version != self._embedder.version or self._expires_at(entry) <= now:
            self.apply_skipped_store(entry)
            return False
        self._insert(entry, vector)
        return True

    def apply_skipped_store(self, entry: Entry) -> None:
        """A logged store that is not replayed (expired, or another embedder's: its vector is
        not read): the older answer it replaced stays replaced."""
        index = self._scopes.get((entry.tenant, entry.scope))
        old = index.exact.get(entry.query) if index is not None else None
        if old is not None:
            self._remove(old)

    def attach_journal(self, journal: Journal) -> None:
        """From now on every change is logged (after the replay, which must not be)."""
        self._journal = journal

    async def sync_journal(self) -> None:
        if self._journal is not None:
            await self._journal.sync()

    def _insert(self, entry: Entry, vector: npt.NDArray[np.float32]) -> bool:
        """Adds the entry (replacing its question's older answer in its scope) and evicts what
        is over capacity: True if the entry itself is still held then."""
        key = (entry.tenant, entry.scope)
        old = self._scopes[key].exact.get(entry.query) if key in self._scopes else None
        if old is not None:
            replaced = self._entries[old].entry_id
            links = self._replaced.get(entry.tenant)
            self._remove(old)  # the tenant's only entry: its links went with it (``_forget``)
            if links is not None:
                self._replaced[entry.tenant] = links
            self._linked(entry.tenant, replaced, entry.entry_id)
        index = self._scopes.get(key)
        if index is None:
            index = self._scopes[key] = ScopeIndex(self._embedder.dim, entry.namespace, self._ann)
        vid = self._next_id
        self._next_id += 1
        index.add(vid, vector, entry.query)
        if index.rebuilding and index not in self._rebuilding:
            self._rebuilding.append(index)
        self._add(vid, entry)
        self._changes += 1
        self._evict_over_capacity()
        return vid in self._entries

    def _linked(self, tenant: str, replaced: str, by: str) -> None:
        """Notes that the tenant's entry ``replaced`` was replaced by ``by`` (a Store of the
        same question), keeping the tenant's last ``REPLACED_PER_TENANT``."""
        links = self._replaced.setdefault(tenant, OrderedDict())
        links[replaced] = by
        links.move_to_end(replaced)
        if len(links) > REPLACED_PER_TENANT:
            links.popitem(last=False)

    def _current(self, tenant: str, entry_id: str) -> int | None:
        """The id (FAISS) of the entry ``entry_id`` names: that entry if it is held, else the
        one that replaced it (a Store of the same question), and so on, within the tenant's
        noted replacements; None when the chain ends at an entry no longer held."""
        vid = self._by_entry_id.get(entry_id)
        links = self._replaced.get(tenant)
        for _ in range(len(links) if links is not None else 0):  # ids are never reused
            if vid is not None or links is None or entry_id not in links:
                break
            entry_id = links[entry_id]
            vid = self._by_entry_id.get(entry_id)
        return vid

    def collect_expired(self) -> None:
        """Removes the entries whose TTL has ended, as every lookup and store does first (a
        change to save: their text leaves the disk at the next snapshot, traffic or none)."""
        self._purge_expired(self._clock.now_ms())

    def export_entries(self) -> CacheContents:
        """A copy of every unexpired entry with its vector, least recently used first.

        Synchronous, so it is consistent: take it on the event loop, write it elsewhere. The
        vectors are copied once, each scope's a slice at a time into their LRU rows.
        """
        now = self._clock.now_ms()
        self._purge_expired(now)
        lru = self._lru.order()
        by_id = np.argsort(lru)  # rows of ``lru`` in id order
        sorted_ids = lru[by_id]
        rows = np.empty((len(lru), self._embedder.dim), dtype=np.float32)
        for index in self._scopes.values():
            for ids, vectors in index.slices():
                found = np.searchsorted(sorted_ids, ids)
                if not np.array_equal(sorted_ids[np.minimum(found, len(lru) - 1)], ids):
                    raise RuntimeError("a scope's index holds ids the cache does not")
                rows[by_id[found]] = vectors
        entries = tuple(self._entries[vid] for vid in lru.tolist())
        purged = {t: at for t, at in self._purged_at_ms.items() if at >= now - PURGE_GUARD_MS}
        return CacheContents(self._embedder.version, self._embedder.dim, entries, rows, purged)

    def restore(self, contents: Contents) -> RestoreReport:
        """Loads exported entries into this empty cache, keeping their ids and LRU order.

        Skips the entries already expired by the clock and those of another embedder version.
        A malformed export (wrong dimension, a query twice in a scope) changes nothing. The
        vectors are read ``RESTORE_CHUNK`` rows at a time straight into each scope's final
        index (``ScopeIndex.sized``): a large scope is an IVF trained on a sample first, so
        no exact index is built to be thrown away and no second copy of the vectors is held.
        """
        if self._entries:
            raise ValueError("restore needs an empty cache")
        now, version = self._clock.now_ms(), self._embedder.version
        expired = other = 0
        groups: dict[ScopeKey, list[int]] = {}  # rows of contents, per scope, in LRU order
        for row, entry in enumerate(contents.entries):
            if entry.embedder_version != version:
                other += 1
            elif self._expires_at(entry) <= now:
                expired += 1
            else:
                groups.setdefault((entry.tenant, entry.scope), []).append(row)
        if groups and contents.dim != self._embedder.dim:
            raise ValueError(
                f"vectors have {contents.dim} dimensions, the embedder {self._embedder.dim}"
            )
        for (tenant, _), rows in groups.items():
            if len({contents.entries[r].query for r in rows}) != len(rows):
                raise ValueError(f"tenant {shown(tenant)}: a scope holds the same query twice")
        kept = np.array(sorted(r for g in groups.values() for r in g), dtype=np.int64)
        vid_at = np.full(len(contents.entries), -1, dtype=np.int64)  # row -> id (-1: skipped)
        vid_at[kept] = np.arange(self._next_id, self._next_id + len(kept), dtype=np.int64)
        self._next_id += len(kept)
        vids = vid_at.tolist()  # one int object per id, shared by the maps and the index
        for row in kept.tolist():
            self._add(vids[row], contents.entries[row])
        self._fill_indexes(contents, groups, vids)
        for tenant, at in contents.purged_at_ms.items():  # the purge guard outlives a restart
            self._purged_at_ms[tenant] = max(at, self._purged_at_ms.get(tenant, at))
        self._changes += 1
        self._evict_over_capacity()
        evicted = len(kept) - len(self._entries)
        return RestoreReport(len(self._entries), expired, other, evicted)

    def _fill_indexes(
        self, contents: Contents, groups: dict[ScopeKey, list[int]], vids: list[int]
    ) -> None:
        """Each scope's index, sized for its rows, then the rows streamed into them in order
        (``vids[row]``: the id of that row of ``contents``, -1 when it is skipped)."""
        dim, entries = self._embedder.dim, contents.entries
        scope_at = np.full(len(entries), -1, dtype=np.int64)  # row -> scope number
        indexes: list[ScopeIndex] = []
        for number, (key, rows) in enumerate(groups.items()):
            where = np.array(rows, dtype=np.int64)
            scope_at[where] = number

            def sample(positions: Ids, where: Ids = where) -> Rows:
                return take_rows(contents, where[positions], dim)

            namespace = entries[rows[0]].namespace
            index = ScopeIndex.sized(dim, namespace, self._ann, len(rows), sample)
            self._scopes[key] = index
            indexes.append(index)
        for start in range(0, len(entries), RESTORE_CHUNK):
            numbers = scope_at[start : start + RESTORE_CHUNK]
            if not (numbers >= 0).any():
                continue
            chunk = contents.rows(start, start + len(numbers))
            order = np.argsort(numbers, kind="stable")  # by scope, LRU order within each
            cuts = np.flatnonzero(np.diff(numbers[order])) + 1
            for local in np.split(order, cuts):
                number = int(numbers[local[0]])
                if number < 0:
                    continue
                at = (start + local).tolist()
                indexes[number].add_many(
                    [vids[r] for r in at], chunk[local], [entries[r].query for r in at]
                )
            del chunk

    def tenant_sizes(self) -> dict[str, tuple[int, int]]:
        """Each tenant's unexpired entries and the number of namespaces holding them."""
        self._purge_expired(self._clock.now_ms())
        entries: dict[str, int] = {}
        namespaces: dict[str, set[str]] = {}
        for (tenant, _), index in self._scopes.items():
            entries[tenant] = entries.get(tenant, 0) + len(index)
            namespaces.setdefault(tenant, set()).add(index.namespace)
        return {tenant: (count, len(namespaces[tenant])) for tenant, count in entries.items()}

    async def drop(self, tenant: str, namespace: str | None = None) -> int:
        """Removes the tenant's entries (of one namespace, or all when None); returns the count.

        With a journal, once the purge is durable and not before: a purge the log could not
        make durable (``NotDurable``: a full disk) removes nothing, so a restart cannot bring
        back what it seemed to remove; the caller is told and retries.
        """
        if not tenant:
            raise InvalidQuery("tenant", "is required")
        self.stop_pending_stores(tenant)  # an answer looked up before the purge is not stored
        # logged even when nothing is found here: a replay may hold entries this process had
        # evicted (evictions are not logged), and the purge must remove them too
        return await self.durably(
            lambda: self._drop_now(tenant, namespace),
            lambda journal, applied: journal.log_drop(tenant, namespace, applied),
        )

    async def drop_entry(self, tenant: str, entry_id: str) -> int:
        """Removes one entry of the tenant (1), or nothing when it is not theirs, expired or
        gone (0); with a journal, once that is durable (``drop``). An entry replaced by a
        Store of the same question is followed to the entry that replaced it (and so on:
        ``_current``), which is removed instead: the same question's answer, looked up before
        the drop, would stay served under the new id. So is one replaced while the drop
        waits for the log: its record precedes the drop's and is applied first. The entry so
        removed is logged by its own id as well: a restart whose snapshot holds it, taken
        after the replacement, knows nothing of the replacement to follow.

        Like a purge it stops the tenant's pending Stores: a request that looked up before
        the drop (the entry's own question, or one worded otherwise that the entry would have
        answered) is making the same model call, and its Store would bring the dropped answer
        back under a new id. Tenant-wide, as a purge of one namespace is: the guard counts
        purges per tenant (``purges``, ``purged_since``), durably through the log's replay
        and the snapshot's recent purges; what it costs is that the tenant's answers in
        flight at that moment are not cached."""
        if not tenant:
            raise InvalidQuery("tenant", "is required")
        self.stop_pending_stores(tenant)
        removed = await self._drop_entry_logged(tenant, entry_id)
        if removed and removed != entry_id:  # gone already here: this record is for a replay
            await self._drop_entry_logged(tenant, removed)
        return 1 if removed else 0

    async def _drop_entry_logged(self, tenant: str, entry_id: str) -> str:
        return await self.durably(  # logged whatever is found (``drop``)
            lambda: self._drop_entry_now(tenant, entry_id),
            lambda journal, applied: journal.log_drop_entry(tenant, entry_id, applied),
        )

    async def drop_refused(self, tenant: str, entry_id: str) -> bool:
        """Removes the entry ``entry_id`` itself (True), an answer refused for its row
        (semantic-cache README, "Refused for its row"): with a journal, once durable, logged
        as a drop of that one entry, reason ``model``; never the entry that replaced it, and
        no pending Store stopped (unlike ``drop_entry``). False when it is gone already."""
        return await self.durably(
            lambda: self._drop_refused_now(tenant, entry_id),
            lambda journal, applied: journal.log_drop_entry(tenant, entry_id, applied, MODEL),
        )

    def apply_drop_refused(self, tenant: str, entry_id: str) -> bool:
        """Re-applies a logged ``drop_refused`` (replay after a restart)."""
        return self._drop_refused_now(tenant, entry_id)

    def _drop_refused_now(self, tenant: str, entry_id: str) -> bool:
        self._purge_expired(self._clock.now_ms())  # an expired one is not counted as dropped
        vid = self._by_entry_id.get(entry_id)
        if vid is None or self._entries[vid].tenant != tenant:
            return False
        self._remove(vid)
        self.stats.refused_drops[MODEL] = self.stats.refused_drops.get(MODEL, 0) + 1
        return True

    async def durably(
        self, change: Callable[[], T], log: Callable[[Journal, Applied[T]], None]
    ) -> T:
        """``change`` applied now without a journal; with one, once the record ``log`` writes
        is durable, and never if it is not (``NotDurable``): what it returned."""
        if self._journal is None:
            return change()
        applied = Applied(change)
        log(self._journal, applied)
        await self._journal.sync()
        return applied.result()

    def apply_drop(self, tenant: str, namespace: str | None = None) -> int:
        """Re-applies a logged purge (replay after a restart): the purge guard counts from
        now, and the entries go."""
        self.stop_pending_stores(tenant)
        return self._drop_now(tenant, namespace)

    def apply_drop_entry(self, tenant: str, entry_id: str) -> int:
        """Re-applies a logged drop of one entry (replay after a restart): the tenant's purge
        guard counts from now (``drop_entry``), and the entry goes if it is there."""
        self.stop_pending_stores(tenant)
        return 1 if self._drop_entry_now(tenant, entry_id) else 0

    def _drop_entry_now(self, tenant: str, entry_id: str) -> str:
        """Removes the entry now (or the one that replaced it: ``_current``) if it is the
        tenant's and unexpired: the id of the entry removed, else "". A replay follows the
        replacements its store records rebuilt, so it removes the same entry."""
        self._purge_expired(self._clock.now_ms())  # an expired entry is not counted as dropped
        vid = self._current(tenant, entry_id)
        if vid is None or self._entries[vid].tenant != tenant:
            return ""
        removed = self._entries[vid].entry_id
        self._remove(vid)
        self.stats.invalidations += 1
        return removed

    def _drop_now(self, tenant: str, namespace: str | None) -> int:
        self._purge_expired(self._clock.now_ms())  # expired entries are not counted as dropped
        keys = [
            key
            for key, index in self._scopes.items()
            if key[0] == tenant and (namespace is None or index.namespace == namespace)
        ]
        dropped = 0
        for key in keys:
            for vid in self._drop_scope(key).ids:
                self._forget(vid)
                dropped += 1
        self.stats.invalidations += dropped
        return dropped

    def stop_pending_stores(self, tenant: str) -> None:
        """The Stores of the tenant's lookups made so far will store nothing (as after a
        purge), its entries left as they are: L1 turned off while model calls were on."""
        self._purges[tenant] = self._purges.get(tenant, 0) + 1
        self._purged_at_ms[tenant] = self._clock.now_ms()

    def purged_since(self, tenant: str, since_ms: int) -> bool:
        """Whether, in this process, the tenant's entries were purged or its pending Stores
        stopped at or after ``since_ms``."""
        at = self._purged_at_ms.get(tenant)
        return at is not None and at >= since_ms

    def purges(self, tenant: str) -> int:
        """How many times, in this process, the tenant's entries were purged (``drop``) or its
        pending Stores stopped (``stop_pending_stores``)."""
        return self._purges.get(tenant, 0)

    def _expires_at(self, entry: Entry) -> int:
        """The entry's fixed expiry; for one that has none yet, created_at + its namespace's
        TTL now. That is how a new store's expiry is fixed, and the migration of entries read
        from a snapshot (format < 3) or a log record written before entries carried one."""
        if entry.expires_at_ms is not None:
            return entry.expires_at_ms
        return entry.created_at_ms + self._policy.ttl_ms(entry.namespace)

    def _stamped(self, entry: Entry) -> Entry:
        """The entry with its expiry fixed (itself when it already is)."""
        if entry.expires_at_ms is not None:
            return entry
        return dataclasses.replace(entry, expires_at_ms=self._expires_at(entry))

    def _add(self, vid: int, entry: Entry) -> None:
        entry = self._stamped(entry)
        self._entries[vid] = entry
        self._held_one(vid, entry)
        heapq.heappush(self._expiry, (self._expires_at(entry), vid))

    def _held_one(self, vid: int, entry: Entry) -> None:
        """Counts the entry held: in its tenant's LRU and bytes (with its scope's
        ``SCOPE_BYTES`` when it is the first its scope holds), by its id, in the stats."""
        key = (entry.tenant, entry.scope)
        held = self._held.get(key, 0)
        self._held[key] = held + 1
        size = entry_bytes(entry, self._embedder.dim) + (0 if held else SCOPE_BYTES)
        self._lru.used(entry.tenant, vid, size)
        self._by_entry_id[entry.entry_id] = vid
        self.stats.added(entry, self._embedder.dim, opened=not held)

    def _purge_expired(self, now: int) -> None:
        """Removes the expired entries (and, first, swaps in the scopes' finished index
        rebuilds: each holds a second copy of its scope's vectors until then)."""
        if self._rebuilding:
            self._rebuilding = [index for index in self._rebuilding if not index.swap_if_built()]
        expired: list[int] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, vid = heapq.heappop(self._expiry)
            if vid in self._entries:  # ids are never reused: a stale item's id is gone
                expired.append(vid)
        if expired:  # all at once: entries stored in a burst expire in one
            self._unindex([(vid, self._forget(vid)) for vid in expired])
            self.stats.expirations += len(expired)
        if len(self._expiry) > 2 * len(self._entries) + 64:  # drop the stale items
            self._expiry = [(self._expires_at(e), v) for v, e in self._entries.items()]
            heapq.heapify(self._expiry)

    def fits(self, payload: bytes, question: str) -> bool:
        """Whether an entry of this answer and (normalised) question is within the byte bound
        alone (one over it is never stored: it would evict every other entry, then itself),
        with its scope's ``SCOPE_BYTES`` (alone, it is the only entry of its scope)."""
        if self._max_bytes is None:
            return True
        size = held_bytes(payload, question, self._embedder.dim) + SCOPE_BYTES
        return size <= self._max_bytes

    def keeps(self, entry: Entry) -> bool:
        """Whether a new entry would outlive the evictions its store makes. The byte bound is
        shared max-min fairly: over it, each tenant ends holding about min(what it holds, a
        level L) where the tenants' holdings so cut fill the bound; the new entry, its tenant's
        most recently used, is kept if it is within L. Checked before a store changes anything,
        so one that would evict itself evicts nothing else either (the tenant's older entries
        stay)."""
        if self._max_bytes is None:
            return True
        key = (entry.tenant, entry.scope)
        size = entry_bytes(entry, self._embedder.dim)
        size += 0 if self._held.get(key) else SCOPE_BYTES  # it opens its scope
        index = self._scopes.get(key)
        old = index.exact.get(entry.query) if index is not None else None
        # an entry replacing its question's answer keeps its scope: only the answer is freed
        freed = entry_bytes(self._entries[old], self._embedder.dim) if old is not None else 0
        if self.stats.held_bytes + size - freed <= self._max_bytes:
            return True
        return self._lru.within_level(entry.tenant, size, self._max_bytes)

    def _evict_over_capacity(self) -> None:
        """Evicts what is over the bounds, each victim chosen as the ones before it are gone
        (``_forget``), then all of them taken out of their scopes' indexes in one call a scope
        (``_unindex``): one large answer evicting 1,182 entries of a 19,000-entry exact scope
        held the event loop 3.3 s, one index compaction per entry. An index removal that fails
        puts the victims it left in the index back (``_unindex``) and raises: an id in an
        index always has its entry (a lookup, a search, a snapshot read it)."""
        evicted: list[tuple[int, Entry]] = []
        while len(self._entries) > self._max_entries:
            vid = self._lru.victim()
            evicted.append((vid, self._forget(vid)))
        # by bytes, as by entries: the least recently used entry of the tenant holding the
        # most bytes, so one tenant's large answers evict its own entries, not another's
        while self._max_bytes is not None and self.stats.held_bytes > self._max_bytes:
            if not self._entries:
                break
            vid = self._lru.victim_by_bytes()
            evicted.append((vid, self._forget(vid)))
        if evicted:
            self._unindex(evicted)
            self.stats.evictions += len(evicted)

    def _remove(self, vid: int) -> None:
        entry = self._entries[vid]
        key = (entry.tenant, entry.scope)
        index = self._scopes[key]
        index.remove(vid, entry.query)  # first: if it fails, the entry and its id stay paired
        self._forget(vid)
        if not len(index):
            self._drop_scope(key)

    def _unindex(self, forgotten: list[tuple[int, Entry]]) -> None:
        """Takes entries already forgotten (``_forget``) out of their scopes' indexes, one
        index call a scope; a scope left empty goes. If a scope's removal fails (it changes
        nothing then), the entries still in an index, that scope's and those of the scopes
        not reached, are put back (``_unforget``) before it raises: an id left in an index
        without its entry failed every lookup of its question (a ``KeyError``) and every
        snapshot after."""
        by_scope: dict[ScopeKey, list[tuple[int, Entry]]] = {}
        for vid, entry in forgotten:
            by_scope.setdefault((entry.tenant, entry.scope), []).append((vid, entry))
        scopes = list(by_scope.items())
        for done, (key, pairs) in enumerate(scopes):
            index = self._scopes[key]
            try:
                index.remove_many([vid for vid, _ in pairs], [e.query for _, e in pairs])
            except BaseException:
                for _, left in scopes[done:]:
                    for vid, entry in left:
                        self._unforget(vid, entry)
                raise
            if not len(index):
                self._drop_scope(key)

    def _drop_scope(self, key: ScopeKey) -> ScopeIndex:
        """Takes a scope's index out of the cache, and out of the rebuilds waiting to be
        swapped in: kept there, a dropped or emptied scope's vectors (its old index and its
        rebuild's) stayed in memory until the build ended and a Lookup swapped it in."""
        index = self._scopes.pop(key)
        self._rebuilding = [other for other in self._rebuilding if other is not index]
        return index

    def _unforget(self, vid: int, entry: Entry) -> None:
        """Undoes ``_forget`` of an entry still in its index (its expiry's heap item is still
        there: only ``_purge_expired`` drops stale ones); it is now its tenant's most recently
        used."""
        self._changes += 1
        self._entries[vid] = entry
        self._held_one(vid, entry)

    def _forget(self, vid: int) -> Entry:
        self._changes += 1
        entry = self._entries.pop(vid)
        key = (entry.tenant, entry.scope)
        left = self._held[key] - 1
        if left:
            self._held[key] = left
        else:
            del self._held[key]
        size = entry_bytes(entry, self._embedder.dim) + (0 if left else SCOPE_BYTES)
        self._lru.forget(entry.tenant, vid, size)
        if not self._lru.holds(entry.tenant):  # its replacements now lead to nothing held
            self._replaced.pop(entry.tenant, None)
        self._by_entry_id.pop(entry.entry_id, None)
        self.stats.removed(entry, self._embedder.dim, closed=not left)
        return entry
