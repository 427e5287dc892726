"""The cache's records: answers, entries and the results of check and store."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

END_TURN = "end_turn"
MAX_TOKENS = "max_tokens"
TOOL_USE = "tool_use"  # a turn that ends calling a tool, as every provider ends it
# The scope version of an entry written before entries carried theirs: v3, the version when
# they began to (an entry of v2 or older still held then is counted as v3's).
UNSTAMPED_SCOPE = "cachemesh.semantic.scope.v3"
# ... except in a snapshot of a format before 4: every build that wrote one looked up scope v1
# (format 4 came before scope v2), so its entries are v1's, whatever build reads them.
BEFORE_FORMAT_4_SCOPE = "cachemesh.semantic.scope.v1"


class InvalidQuery(ValueError):
    """A request field is out of range; ``field`` names it as the client spells it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Answer:
    """A model answer as the cache keeps it; ``payload`` is opaque to the cache."""

    payload: bytes  # the serialized cachemesh.v1.CachedAnswer
    stop_reason: str
    output_tokens: int
    has_tool_use: bool
    # A content block of non-blank text. Read at Store only (an answer without it nor a tool
    # call is empty, never stored), so never persisted: a stored answer always had one.
    has_text: bool = True
    # A tool call whose arguments the model wrote as no JSON object (``answers``): never
    # stored, nor served. Read from the payload at Store and when an entry is loaded (one
    # stored before the Store read it may hold one), so never persisted.
    unparsed_tool_call: bool = False


@dataclass(frozen=True)
class Entry:
    entry_id: str  # uuid4 hex
    tenant: str
    scope: str
    namespace: str
    query: str  # the normalised last user turn
    answer: Answer
    created_at_ms: int
    embedder_version: str
    # Fixed when the entry is stored: created_at_ms + its namespace's TTL at that moment, so a
    # later TTL change never moves it. None only before the store fixes it (``EntryStore``)
    # or in a record written before entries carried it (migrated on load, see persistence.py).
    expires_at_ms: int | None = None
    # The rule its scope was computed by (``query.SCOPE_VERSION`` when stored): one of another
    # version is in a scope no lookup names any more, held until its TTL or evicted first.
    scope_version: str = UNSTAMPED_SCOPE


@dataclass(frozen=True)
class CheckResult:
    entry: Entry | None  # the served entry, on a hit
    similarity: float = 0.0  # of the served entry, clamped to [0, 1]
    exact: bool = False
    # best candidate of the search, hit or not; an exact match passed over for its tier is not
    # one (the refusal names it): a tier-refused exact match with no paraphrase found reads 0
    best_similarity: float = 0.0
    skip_reason: str = ""  # why no lookup was done, when none was
    refusal: str = ""  # why candidates above the threshold were not served (verifier, ambiguity)
    leader: bool = False  # a miss that took the lease: this caller calls the model and stores
    lease_id: str = ""  # the lease taken, when leader (``Release`` names it)
    pending: bool = False  # a miss while an identical request still holds the lease
    waited: bool = False  # a hit served after waiting for an identical in-flight miss

    @property
    def hit(self) -> bool:
        return self.entry is not None


@dataclass(frozen=True)
class StoreResult:
    stored: bool
    entry_id: str = ""
    skip_reason: str = ""
    # refused for what the answer is (cut, a refusal, a tool call, too large, empty), not for
    # the request or the moment: the same request would most likely get such an answer again
    uncacheable: bool = False


class Contents(Protocol):
    """What ``restore`` reads: the entries, least recently used first, and their vectors a
    slice of rows at a time (held in memory, or read from a snapshot file when asked)."""

    @property
    def embedder_version(self) -> str: ...  # of the cache that exported them

    @property
    def dim(self) -> int: ...

    @property
    def entries(self) -> tuple[Entry, ...]: ...

    @property
    def purged_at_ms(self) -> Mapping[str, int]: ...  # tenant -> its last purge, if recent

    def rows(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        """The vectors of entries[start:stop], as a (stop - start, dim) float32 array."""
        ...


@dataclass(frozen=True)
class CacheContents:
    """Every entry with its vector, least recently used first (``export_entries``/``restore``)."""

    embedder_version: str  # of the cache that exported them
    dim: int
    entries: tuple[Entry, ...]
    vectors: npt.NDArray[np.float32]  # (len(entries), dim); row i is entries[i]'s vector
    # tenant -> when its entries were last purged (or its pending Stores stopped), within
    # ``PURGE_GUARD_MS``: a restart must not let a Store from before the purge put one back
    purged_at_ms: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.dtype != np.float32 or self.vectors.shape != (len(self.entries), self.dim):
            raise ValueError(
                f"vectors must be float32 of shape ({len(self.entries)}, {self.dim}), "
                f"got {self.vectors.dtype} {self.vectors.shape}"
            )

    def rows(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        return self.vectors[start:stop]


@dataclass(frozen=True)
class RestoreReport:
    restored: int  # now in the cache
    expired: int = 0  # skipped: past their expiry by the cache's clock
    other_embedder: int = 0  # skipped: made by another embedder version
    evicted: int = 0  # loaded, then evicted: the capacity is smaller than the snapshot
