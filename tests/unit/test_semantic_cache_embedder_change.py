"""After an embedder change (a model of another dimension), the write-ahead log's stores of
the old embedder are skipped with one warning, as the snapshot's entries are, instead of
stopping the start; a store of the current embedder that is malformed still stops it, naming
the log's segment."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.persistence import SnapshotStore, entry_json
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WalError, WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_persistence import q
from tests.unit.test_semantic_cache_rules import answer

OLD, NEW = "old-model@1", "new-model@2"


def cache(clock: ManualClock, dim: int, version: str) -> SemanticCache:
    embedder = FakeEmbedder(dim=dim, version=version)
    return SemanticCache(embedder, clock, threshold=0.5, ttl_s=3600, max_entries=100)


async def started(tmp_path: Path, clock: ManualClock, dim: int, version: str) -> SemanticCache:
    """A process on the data directory; stopped by SIGKILL (no last snapshot) when dropped."""
    started = cache(clock, dim, version)
    wal = WriteAheadLog(tmp_path / "wal")
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, wal).open(started)
    return started


async def test_log_stores_of_another_embedder_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    old = await started(tmp_path, clock, 64, OLD)
    for i in range(3):
        assert (await old.store(q(f"question {i}"), answer(b"old"))).stored
    # a record after them (of another tenant: a drop stops its tenant's Stores in flight)
    assert (await old.drop_entry("b", "no-such-entry")) == 0
    with caplog.at_level(logging.WARNING, logger="cachemesh.semantic_cache.persistence"):
        new = await started(tmp_path, clock, 32, NEW)  # the upgrade: 32 dimensions
    assert len(new) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"skipped 3 write-ahead-log store records of embedder {OLD} (this one is {NEW}): "
        "their entries are dropped"
    ]
    assert (await new.store(q("question 0"), answer(b"new"))).stored
    again = await started(tmp_path, clock, 32, NEW)  # killed again: the log replayed in order
    hit = await again.check(q("question 0"))
    assert hit.entry is not None and hit.entry.answer.payload == b"new"
    assert len(again) == 1


async def test_a_malformed_store_of_this_embedder_names_the_segment(tmp_path: Path) -> None:
    clock = ManualClock()
    first = await started(tmp_path, clock, 32, NEW)
    assert (await first.store(q("question 0"), answer(b"a"))).stored
    stored = first.export_entries().entries[0]
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    vector = base64.b64encode(np.zeros(31, dtype="<f4").tobytes()).decode()
    wal.append({"op": "store", "entry": entry_json(stored), "vector": vector})
    wal.close()
    segment = tmp_path / "wal" / f"{2:020d}.log"
    assert segment.is_file()
    message = f"{segment}: write-ahead-log record 2 is malformed: vector of 31 values"
    with pytest.raises(WalError, match=re.escape(message)):
        await started(tmp_path, clock, 32, NEW)
