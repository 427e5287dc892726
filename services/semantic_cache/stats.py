"""What the L1 cache holds and removes, as plain counts its metrics read at each scrape.

``EntryStore`` updates one ``StoreStats`` in the synchronous sections where entries are added
and removed (a dict update and an add: nothing on a lookup's path). An entry's bytes are an
estimate of what it holds: its answer's serialized payload, its normalised question and its
vector (float32). A scope's index costs ``SCOPE_BYTES`` besides its entries: charged to its
tenant with the scope's first entry held, released with its last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.semantic_cache.query import SCOPE_VERSION
from services.semantic_cache.records import Entry

# What a scope's own index costs besides its entries (an exact FAISS index, its id map and
# their Python wrappers, the scope's key maps, its places in the cache's maps), measured as
# the RSS per Store of one-entry scopes less that of as many entries stored in one scope,
# through the cache, real FAISS, 384 dimensions: 1,713 / 1,643 / 1,718 bytes at 10k / 20k /
# 40k (ScopeIndex alone: 1,434). Uncounted, a tenant storing each answer in its own
# namespace (one a conversation) held about twice the bytes the bound counted.
SCOPE_BYTES = 1_700


def entry_bytes(entry: Entry, dim: int) -> int:
    return held_bytes(entry.answer.payload, entry.query, dim)


def held_bytes(payload: bytes, question: str, dim: int) -> int:
    """What an entry of this answer and (normalised) question holds."""
    return len(payload) + len(question.encode()) + 4 * dim


@dataclass
class StoreStats:
    entries: dict[str, int] = field(default_factory=dict)  # tenant -> entries held
    bytes: dict[str, int] = field(default_factory=dict)  # tenant -> bytes held
    held_bytes: int = 0  # of all tenants (what ``SEMANTIC_CACHE_MAX_BYTES`` bounds)
    evictions: int = 0  # over capacity
    expirations: int = 0  # at their TTL
    invalidations: int = 0  # by Drop
    # by reason: answers no Lookup of their scope is served any more (``drop_refused``);
    # ``model``: made by a row the scope's model no longer resolves to
    refused_drops: dict[str, int] = field(default_factory=dict)
    # Of ``entries``, those of another scope version than this build's: no lookup names their
    # scope, so they are never served (held until their TTL, or evicted first: never used)
    old_scope: int = 0
    scope_version: str = SCOPE_VERSION  # this build's

    def added(self, entry: Entry, dim: int, opened: bool = False) -> None:
        """``opened``: the entry is the first its scope holds (charged ``SCOPE_BYTES`` too)."""
        tenant = entry.tenant
        size = entry_bytes(entry, dim) + (SCOPE_BYTES if opened else 0)
        self.old_scope += entry.scope_version != self.scope_version
        self.entries[tenant] = self.entries.get(tenant, 0) + 1
        self.bytes[tenant] = self.bytes.get(tenant, 0) + size
        self.held_bytes += size

    def removed(self, entry: Entry, dim: int, closed: bool = False) -> None:
        """``closed``: the entry was the last its scope held (its ``SCOPE_BYTES`` released)."""
        tenant = entry.tenant
        size = entry_bytes(entry, dim) + (SCOPE_BYTES if closed else 0)
        self.old_scope -= entry.scope_version != self.scope_version
        self.held_bytes -= size
        left = self.entries.get(tenant, 0) - 1
        if left <= 0:
            self.entries.pop(tenant, None)
            self.bytes.pop(tenant, None)
            return
        self.entries[tenant] = left
        self.bytes[tenant] = self.bytes.get(tenant, 0) - size
