"""The cache's changes as write-ahead-log records, and their replay after a restart.

``WalJournal`` is what ``SemanticCache`` calls in the synchronous section of each change
(``log_store``, ``log_drop``, ``log_drop_entry``: an operator's, or one of an answer no Lookup
is served any more, reason ``model``), so the log's order is the order of the
changes, each with the function that applies it (``Applied``): the log runs it once the
record is durable, in the log's order, and never when the record is lost (a full disk), so
no change is visible before it is durable. ``sync`` is awaited before the change is
acknowledged. ``replay`` applies the records a snapshot does not contain, in order.

A store record's entry carries its fixed ``expires_at_ms``. Store records have no version
number: one written before entries carried it lacks the field and is replayed with
created_at + its namespace's TTL at replay (``EntryStore._expires_at``, the migration); a
field that is present but not an integer after created_at makes the record malformed. A store
of another embedder version (the model changed: its vector may have another dimension) is
skipped before its vector is read, as a snapshot's entries of another embedder are, with one
warning counting them; any other malformed record stops the replay, naming its segment.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from services.semantic_cache.persistence import entry_from_json, entry_json
from services.semantic_cache.records import UNSTAMPED_SCOPE, Entry
from services.semantic_cache.wal import WalError, WriteAheadLog

log = logging.getLogger("cachemesh.semantic_cache.persistence")
T = TypeVar("T")
# The reason of a drop of one entry refused for its row (``EntryStore.drop_refused``; README,
# "Refused for its row"), replayed as that entry alone
MODEL = "model"
# The records' version: this build writes none (version 1). A later build whose record this one
# must not replay as it reads it (a field it would ignore, an op it would guess at) writes a
# higher "v", or a new op: either stops this build's replay, naming a newer build's record.
RECORD_VERSION = 1


class NewerRecord(ValueError):
    """A record only a newer build knows (an op, a drop reason or a record version)."""


class Applied(Generic[T]):
    """A change to apply once its record is durable, and what it returned (``result``)."""

    def __init__(self, change: Callable[[], T]) -> None:
        self._change = change
        self._done = False
        self._value: T | None = None
        self._error: Exception | None = None

    def __call__(self) -> None:
        try:
            self._value = self._change()
        except Exception as exc:  # the owner hears of it (``result``), not the log
            self._error = exc
        self._done = True

    def result(self) -> T:
        """What the change returned (after the sync that made its record durable); raises
        what it raised."""
        if self._error is not None:
            raise self._error
        if not self._done:
            raise RuntimeError("a change was acknowledged before it was applied")
        return self._value  # type: ignore[return-value]


class Journal(Protocol):
    def log_store(
        self, entry: Entry, vector: npt.NDArray[np.float32], apply: Callable[[], None]
    ) -> None: ...

    def log_drop(self, tenant: str, namespace: str | None, apply: Callable[[], None]) -> None: ...

    def log_drop_entry(
        self, tenant: str, entry_id: str, apply: Callable[[], None], reason: str = ""
    ) -> None: ...

    async def sync(self) -> None: ...


class Replayable(Protocol):
    """What replay needs from the cache (``SemanticCache`` has it)."""

    @property
    def embedder_version(self) -> str: ...

    def apply_skipped_store(self, entry: Entry) -> None: ...

    def apply_store(self, entry: Entry, vector: npt.NDArray[np.float32]) -> bool: ...

    def apply_drop(self, tenant: str, namespace: str | None = None) -> int: ...

    def apply_drop_entry(self, tenant: str, entry_id: str) -> int: ...

    def apply_drop_refused(self, tenant: str, entry_id: str) -> bool: ...


class WalJournal:
    """Each ``log_*`` raises ``NotDurable`` while the log is failed (nothing is logged)."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self.wal = wal

    def log_store(
        self, entry: Entry, vector: npt.NDArray[np.float32], apply: Callable[[], None]
    ) -> None:
        row = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        self.wal.append(
            {"op": "store", "entry": entry_json(entry), "vector": base64.b64encode(row).decode()},
            apply,
        )

    def log_drop(self, tenant: str, namespace: str | None, apply: Callable[[], None]) -> None:
        self.wal.append({"op": "drop", "tenant": tenant, "namespace": namespace}, apply)

    def log_drop_entry(
        self, tenant: str, entry_id: str, apply: Callable[[], None], reason: str = ""
    ) -> None:
        """``reason`` "" (an operator's drop) or ``MODEL``."""
        record = {"op": "drop_entry", "tenant": tenant, "entry_id": entry_id}
        self.wal.append(record | ({"reason": reason} if reason else {}), apply)

    async def sync(self) -> None:
        await self.wal.sync()


def replay(
    cache: Replayable,
    records: Iterable[dict[str, Any]],
    after_seq: int,
    dim: int,
    wal: WriteAheadLog | None = None,
    unstamped: str = UNSTAMPED_SCOPE,
) -> int:
    """Applies the records with seq > ``after_seq``; returns how many were replayed (the
    stores of another embedder, skipped, included). ``wal``: the log they were read from, for
    an error to name the segment; ``unstamped``: the scope version of a stored entry without
    one (the snapshot's before them says it: ``SnapshotFile.unstamped``)."""
    applied = 0
    skipped: dict[str, int] = {}  # embedder version -> its store records skipped
    for record in records:
        if record["seq"] <= after_seq:
            continue
        try:
            other = _apply(cache, record, dim, unstamped)
        except NewerRecord as exc:  # a rollback's: not damage, and not to be guessed at
            where = f"{_segment(wal, record['seq'])}: " if wal is not None else ""
            raise WalError(
                f"{where}write-ahead-log record {record['seq']} is a newer build's ({exc}): "
                "this one does not know what it does, so it replays nothing past it. Start "
                "that build again, or, to run this one, move the snapshot and the wal/ "
                "directory aside together, and L1 starts empty (misses until answered again)"
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            where = f"{_segment(wal, record['seq'])}: " if wal is not None else ""
            raise WalError(
                f"{where}write-ahead-log record {record['seq']} is malformed: {exc}"
            ) from exc
        if other is not None:
            skipped[other] = skipped.get(other, 0) + 1
        applied += 1
    if skipped:
        log.warning(
            "skipped %d write-ahead-log store records of embedder %s (this one is %s): their "
            "entries are dropped",
            sum(skipped.values()),
            ", ".join(sorted(skipped)),
            cache.embedder_version,
        )
    return applied


def _segment(wal: WriteAheadLog, seq: int) -> Path:
    """The segment holding record ``seq`` (each is named after its first record)."""
    holding = [path for path in wal.segments() if int(path.stem) <= seq]
    return holding[-1] if holding else wal.directory


def _apply(
    cache: Replayable, record: dict[str, Any], dim: int, unstamped: str = UNSTAMPED_SCOPE
) -> str | None:
    """Applies one record; the embedder version of a store it skipped, else None."""
    version = record.get("v", RECORD_VERSION)
    if type(version) is int and version > RECORD_VERSION:
        raise NewerRecord(f"record version {version}, this build writes {RECORD_VERSION}")
    op = record["op"]
    if op == "store":
        entry = entry_from_json(record["entry"], unstamped=unstamped)
        if entry.embedder_version != cache.embedder_version:
            cache.apply_skipped_store(entry)  # its vector is another embedder's: not read
            return entry.embedder_version
        raw = base64.b64decode(record["vector"], validate=True)
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if vector.shape != (dim,):
            raise ValueError(f"vector of {vector.size} values, the embedder has {dim}")
        cache.apply_store(entry, vector)
    elif op == "drop":
        namespace = record["namespace"]
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError("namespace is not a string")
        cache.apply_drop(str(record["tenant"]), namespace)
    elif op == "drop_entry":
        reason = record.get("reason", "")
        if reason == MODEL:
            cache.apply_drop_refused(str(record["tenant"]), str(record["entry_id"]))
        elif reason:
            raise NewerRecord(f"unknown drop reason {reason!r}")
        else:
            cache.apply_drop_entry(str(record["tenant"]), str(record["entry_id"]))
    else:
        raise NewerRecord(f"unknown op {op!r}")
    return None
