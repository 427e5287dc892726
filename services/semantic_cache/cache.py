"""The L1 cache logic: check, store, drop (a small explicit API, RedisVL-style).

Entries live in one FAISS index per (tenant, scope). An entry's TTL is an absolute age (reads
never extend it); capacity is total and evicts the least recently used entry. Every mutation
happens in a synchronous section after the awaited embedding, so no two coroutines interleave
inside one: what a store acknowledges is visible to the next check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import math
import uuid
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from services.common.clock import Clock
from services.semantic_cache.batcher import MicroBatcher
from services.semantic_cache.embedder import Embedder
from services.semantic_cache.index import AnnSettings, ScopeIndex
from services.semantic_cache.journal import Journal
from services.semantic_cache.leases import Leases, wait
from services.semantic_cache.matching import choose
from services.semantic_cache.policy import NamespacePolicy
from services.semantic_cache.query import Query
from services.semantic_cache.records import (
    END_TURN,
    Answer,
    CacheContents,
    CheckResult,
    Entry,
    InvalidQuery,
    RestoreReport,
    StoreResult,
)
from services.semantic_cache.verifier import Verifier

ScopeKey = tuple[str, str]  # (tenant, scope)


def _clamp(similarity: float) -> float:
    return min(1.0, max(0.0, similarity))


class SemanticCache:
    def __init__(
        self,
        embedder: Embedder,
        clock: Clock,
        *,
        threshold: float = 0.88,
        ttl_s: float = 86_400.0,
        max_entries: int = 100_000,
        top_k: int = 8,
        verifier: Verifier | None = None,
        margin: float = 0.0,
        policy: NamespacePolicy | None = None,
        leases: Leases | None = None,
        batcher: MicroBatcher | None = None,
        ann: AnnSettings | None = None,
    ) -> None:
        """``policy`` (per-namespace TTLs and store rules) wins over ``ttl_s`` when given."""
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._policy = policy if policy is not None else NamespacePolicy(ttl_s=ttl_s)
        self._leases = leases
        self._journal: Journal | None = None
        self._batcher = batcher  # None = one embedding call per text
        self._ann = ann  # None = every scope stays exact (flat)
        if max_entries < 1 or top_k < 1:
            raise ValueError("max_entries and top_k must be >= 1")
        if not (math.isfinite(margin) and 0.0 <= margin <= 1.0):
            raise ValueError(f"margin must be within [0, 1], got {margin}")
        self._verifier = verifier
        self._margin = margin
        self._embedder = embedder
        self._clock = clock
        self._threshold = threshold
        self._max_entries = max_entries
        self._top_k = top_k
        self._entries: dict[int, Entry] = {}  # FAISS id -> entry
        self._lru: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at_ms, id); may be stale
        self._by_entry_id: dict[str, int] = {}
        self._scopes: dict[ScopeKey, ScopeIndex] = {}
        self._next_id = 0
        self._changes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dim(self) -> int:
        return self._embedder.dim

    @property
    def embedder_version(self) -> str:
        return self._embedder.version

    @property
    def changes(self) -> int:
        """Grows on every change a snapshot would show (store, removal, a hit's recency)."""
        return self._changes

    async def check(self, query: Query, wait_s: float = 0.0) -> CheckResult:
        """The best servable entry of the query's scope with similarity >= the threshold.

        With leases, a miss takes the lease of its (tenant, scope, query) when none is held
        (``CheckResult.leader``: the caller makes the model call and stores the answer); when
        one is held, the check waits up to ``wait_s`` seconds for it to end, then looks again.
        """
        result = await self._check(query)
        if result.hit or result.skip_reason or self._leases is None:
            return result
        key = (query.tenant, query.scope, query.normalised)
        event = self._leases.held(key)
        if event is not None and await wait(event, wait_s):
            result = await self._check(query)
            if result.hit:
                return dataclasses.replace(result, waited=True)
            event = self._leases.held(key)
        if event is None and query.mode == "use":
            self._leases.take(key)
            return dataclasses.replace(result, leader=True)
        return result

    async def _check(self, query: Query) -> CheckResult:
        _require_tenant(query)
        threshold = self._threshold_for(query)
        if query.mode in ("bypass", "refresh"):
            return CheckResult(None, skip_reason=f"semantic mode {query.mode} skips the read")
        text = query.text
        if text is None or not query.normalised:
            return CheckResult(None, skip_reason=_NO_USER_TEXT)
        now = self._clock.now_ms()
        self._purge_expired(now)
        index = self._scopes.get((query.tenant, query.scope))
        if index is None:
            return CheckResult(None)
        vid = index.exact.get(query.normalised)
        if vid is not None and self._servable(self._entries[vid], query, now):
            return self._hit(vid, 1.0, exact=True, best=1.0)
        vector = await self._embed(text)
        # From here to the return nothing awaits: the index cannot change under us.
        now = self._clock.now_ms()
        self._purge_expired(now)
        index = self._scopes.get((query.tenant, query.scope))
        if index is None:
            return CheckResult(None)
        candidates = [(v, _clamp(s)) for v, s in index.search(vector, self._top_k)]
        best = max((s for _, s in candidates), default=0.0)
        choice = choose(
            candidates,
            self._entries.__getitem__,
            lambda entry: self._servable(entry, query, now),
            query.normalised,
            threshold,
            self._verifier,
            self._margin,
        )
        if choice.vid is not None:
            return self._hit(choice.vid, choice.similarity, exact=False, best=best)
        return CheckResult(None, best_similarity=best, refusal=choice.reason)

    async def store(self, query: Query, answer: Answer) -> StoreResult:
        """Stores a cacheable answer, replacing the entry of the same normalised query.

        Stored or not, it ends the lease of the query's key: its waiters look again.
        """
        _require_tenant(query)
        try:
            return await self._store(query, answer)
        finally:
            if self._leases is not None and query.tenant:
                self._leases.end((query.tenant, query.scope, query.normalised))

    async def _store(self, query: Query, answer: Answer) -> StoreResult:
        reason = _store_skip_reason(query, answer, self._policy)
        if reason or query.text is None:
            return StoreResult(False, skip_reason=reason or _NO_USER_TEXT)
        vector = await self._embed(query.text)
        # From here to the sync nothing awaits: the log's order is the order of the changes.
        now = self._clock.now_ms()
        self._purge_expired(now)
        entry = Entry(
            entry_id=uuid.uuid4().hex,
            tenant=query.tenant,
            scope=query.scope,
            namespace=query.namespace,
            query=query.normalised,
            answer=answer,
            created_at_ms=now,
            embedder_version=self._embedder.version,
        )
        self._insert(entry, vector)
        if self._journal is not None:
            self._journal.log_store(entry, vector)
            await self._journal.sync()  # durable before it is acknowledged
        return StoreResult(True, entry_id=entry.entry_id)

    def apply_store(self, entry: Entry, vector: npt.NDArray[np.float32]) -> bool:
        """Re-applies a logged store (replay after a restart); False if expired or stale."""
        if entry.embedder_version != self._embedder.version:
            return False
        now = self._clock.now_ms()
        self._purge_expired(now)
        if self._expires_at(entry) <= now:
            return False
        self._insert(entry, vector)
        return True

    def attach_journal(self, journal: Journal) -> None:
        """From now on every change is logged (after the replay, which must not be)."""
        self._journal = journal

    async def sync_journal(self) -> None:
        if self._journal is not None:
            await self._journal.sync()

    def _insert(self, entry: Entry, vector: npt.NDArray[np.float32]) -> None:
        key = (entry.tenant, entry.scope)
        old = self._scopes[key].exact.get(entry.query) if key in self._scopes else None
        if old is not None:
            self._remove(old)
        index = self._scopes.get(key)
        if index is None:
            index = self._scopes[key] = ScopeIndex(self._embedder.dim, entry.namespace, self._ann)
        vid = self._next_id
        self._next_id += 1
        index.add(vid, vector, entry.query)
        self._add(vid, entry)
        self._changes += 1
        self._evict_over_capacity()

    def export_entries(self) -> CacheContents:
        """A copy of every unexpired entry with its vector, least recently used first.

        Synchronous, so it is consistent: take it on the event loop, write it elsewhere.
        """
        self._purge_expired(self._clock.now_ms())
        dim = self._embedder.dim
        parts = [index.export() for index in self._scopes.values()]
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, dim), np.float32)
        position = {vid: i for i, vid in enumerate(ids.tolist())}
        order = np.fromiter((position[vid] for vid in self._lru), np.int64, len(self._lru))
        entries = tuple(self._entries[vid] for vid in self._lru)
        return CacheContents(self._embedder.version, dim, entries, rows[order])

    def restore(self, contents: CacheContents) -> RestoreReport:
        """Loads exported entries into this empty cache, keeping their ids and LRU order.

        Skips the entries already expired by the clock and those of another embedder version.
        A malformed export (wrong dimension, a query twice in a scope) changes nothing.
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
                raise ValueError(f"tenant {tenant!r}: a scope holds the same query twice")
        vid_of = {
            row: self._next_id + i
            for i, row in enumerate(sorted(r for g in groups.values() for r in g))
        }
        self._next_id += len(vid_of)
        for row, vid in vid_of.items():
            self._add(vid, contents.entries[row])
        for key, rows in groups.items():
            index = self._scopes[key] = ScopeIndex(
                self._embedder.dim, contents.entries[rows[0]].namespace, self._ann
            )
            index.add_many(
                [vid_of[r] for r in rows],
                contents.vectors[rows],
                [contents.entries[r].query for r in rows],
            )
        self._changes += 1
        self._evict_over_capacity()
        evicted = len(vid_of) - len(self._entries)
        return RestoreReport(len(self._entries), expired, other, evicted)

    def drop(self, tenant: str, namespace: str | None = None) -> int:
        """Removes the tenant's entries (of one namespace, or all when None); returns the count."""
        if not tenant:
            raise InvalidQuery("tenant", "is required")
        keys = [
            key
            for key, index in self._scopes.items()
            if key[0] == tenant and (namespace is None or index.namespace == namespace)
        ]
        dropped = 0
        for key in keys:
            for vid in self._scopes.pop(key).ids:
                self._forget(vid)
                dropped += 1
        if dropped and self._journal is not None:
            self._journal.log_drop(tenant, namespace)  # durable at the caller's sync_journal
        return dropped

    def drop_entry(self, tenant: str, entry_id: str) -> int:
        """Removes one entry of the tenant (1), or nothing when it is not theirs or gone (0)."""
        if not tenant:
            raise InvalidQuery("tenant", "is required")
        vid = self._by_entry_id.get(entry_id)
        if vid is None or self._entries[vid].tenant != tenant:
            return 0
        self._remove(vid)
        if self._journal is not None:
            self._journal.log_drop_entry(tenant, entry_id)
        return 1

    def _threshold_for(self, query: Query) -> float:
        if query.threshold is None:
            return self._threshold
        if not (math.isfinite(query.threshold) and 0.0 <= query.threshold <= 1.0):
            raise InvalidQuery(
                "cache.threshold", f"must be a number within [0, 1], got {query.threshold}"
            )
        return query.threshold

    def _servable(self, entry: Entry, query: Query, now: int) -> bool:
        answer = entry.answer
        return (
            now < self._expires_at(entry)
            and answer.stop_reason == END_TURN
            and answer.output_tokens <= query.max_tokens
            and (not answer.has_tool_use or self._policy.allows_tool_use(entry.namespace))
            and entry.embedder_version == self._embedder.version
        )

    def _expires_at(self, entry: Entry) -> int:
        return entry.created_at_ms + self._policy.ttl_ms(entry.namespace)

    def _add(self, vid: int, entry: Entry) -> None:
        self._entries[vid] = entry
        self._lru[vid] = None
        self._by_entry_id[entry.entry_id] = vid
        heapq.heappush(self._expiry, (self._expires_at(entry), vid))

    def _hit(self, vid: int, similarity: float, *, exact: bool, best: float) -> CheckResult:
        self._lru.move_to_end(vid)
        self._changes += 1
        return CheckResult(
            self._entries[vid], similarity=similarity, exact=exact, best_similarity=best
        )

    async def _embed(self, text: str) -> npt.NDArray[np.float32]:
        if self._batcher is not None:
            return await self._batcher.embed_one(text)
        vectors = await asyncio.to_thread(self._embedder.embed, [text])
        row: npt.NDArray[np.float32] = vectors[0]
        return row

    def _purge_expired(self, now: int) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, vid = heapq.heappop(self._expiry)
            if vid in self._entries:  # ids are never reused: a stale item's id is gone
                self._remove(vid)
        if len(self._expiry) > 2 * len(self._entries) + 64:  # drop the stale items
            self._expiry = [(self._expires_at(e), v) for v, e in self._entries.items()]
            heapq.heapify(self._expiry)

    def _evict_over_capacity(self) -> None:
        while len(self._entries) > self._max_entries:
            self._remove(next(iter(self._lru)))

    def _remove(self, vid: int) -> None:
        entry = self._forget(vid)
        key = (entry.tenant, entry.scope)
        index = self._scopes[key]
        index.remove(vid, entry.query)
        if not len(index):
            del self._scopes[key]

    def _forget(self, vid: int) -> Entry:
        self._changes += 1
        self._lru.pop(vid, None)
        entry = self._entries.pop(vid)
        self._by_entry_id.pop(entry.entry_id, None)
        return entry


_NO_USER_TEXT = "the last message is not a user turn with text (a prefill, or no text)"


def _require_tenant(query: Query) -> None:
    if not query.tenant:
        raise InvalidQuery("tenant", "is required")


def _store_skip_reason(query: Query, answer: Answer, policy: NamespacePolicy) -> str:
    if query.mode in ("no_store", "bypass"):
        return f"semantic mode {query.mode} never stores"
    if query.text is None or not query.normalised:
        return _NO_USER_TEXT
    if answer.stop_reason != END_TURN:
        return f"stop_reason {answer.stop_reason or '(unset)'}: only end_turn answers are stored"
    if answer.has_tool_use and not policy.allows_tool_use(query.namespace):
        return f"the answer holds a tool call (namespace {query.namespace!r} does not allow it)"
    if query.temperature > policy.max_temperature:
        return (
            f"temperature {query.temperature} is above the cacheable limit {policy.max_temperature}"
        )
    return ""
