"""What the L1 cache holds and removes, as plain counts its metrics read at each scrape.

``EntryStore`` updates one ``StoreStats`` in the synchronous sections where entries are added
and removed (a dict update and an add: nothing on a lookup's path). An entry's bytes are an
estimate of what it holds: its answer's serialized payload, its normalised question and its
vector (float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.semantic_cache.records import Entry


def entry_bytes(entry: Entry, dim: int) -> int:
    return len(entry.answer.payload) + len(entry.query.encode()) + 4 * dim


@dataclass
class StoreStats:
    entries: dict[str, int] = field(default_factory=dict)  # tenant -> entries held
    bytes: dict[str, int] = field(default_factory=dict)  # tenant -> bytes held
    evictions: int = 0  # over capacity
    expirations: int = 0  # at their TTL
    invalidations: int = 0  # by Drop

    def added(self, entry: Entry, dim: int) -> None:
        tenant = entry.tenant
        self.entries[tenant] = self.entries.get(tenant, 0) + 1
        self.bytes[tenant] = self.bytes.get(tenant, 0) + entry_bytes(entry, dim)

    def removed(self, entry: Entry, dim: int) -> None:
        tenant = entry.tenant
        left = self.entries.get(tenant, 0) - 1
        if left <= 0:
            self.entries.pop(tenant, None)
            self.bytes.pop(tenant, None)
            return
        self.entries[tenant] = left
        self.bytes[tenant] = self.bytes.get(tenant, 0) - entry_bytes(entry, dim)
