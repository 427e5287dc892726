"""A restore streams a snapshot's vectors into each scope's final index, a chunk at a time.

No copy of all the vectors is held (the file is read a chunk of rows at a time), and a scope
large enough to be approximate is an IVF from the start: no exact index built to be thrown
away, no background rebuild. Every kept entry keeps its vector, its scope and its LRU place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache import entries as entries_module
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import l2_normalise
from services.semantic_cache.index import AnnSettings
from services.semantic_cache.persistence import SnapshotError, SnapshotFile, SnapshotStore
from services.semantic_cache.records import Answer, CacheContents, Entry
from services.semantic_cache.snapshotter import Snapshotter
from tests.unit.semantic_cache_support import FakeEmbedder

DIM = 16
NOW = 1_700_000_000_000
CHUNK = 7  # rows read at once in these tests: every scope spans several chunks


def contents(n: int) -> CacheContents:
    """``n`` entries, LRU order, spread over three scopes (the first holds most), with some
    of another embedder version and some expired, interleaved."""
    rng = np.random.default_rng(1)
    vectors = l2_normalise(rng.standard_normal((n, DIM)).astype(np.float32))
    made: list[Entry] = []
    for i in range(n):
        scope = "big" if i % 4 else f"small{i % 8}"
        version = "fake@0" if i % 13 == 5 else "fake@1"
        expires = NOW - 1 if i % 11 == 3 else NOW + 60_000  # created at NOW - 9
        answer = Answer(f"answer {i}".encode(), "end_turn", 1, False)
        made.append(Entry(f"{i:032x}", "t", scope, "", f"q{i}", answer, NOW - 9, version, expires))
    return CacheContents("fake@1", DIM, tuple(made), vectors)


def new_cache(min_entries: int = 100) -> SemanticCache:
    ann = AnnSettings(min_entries=min_entries, nprobe=1024)
    return SemanticCache(FakeEmbedder(dim=DIM), ManualClock(NOW), max_entries=10_000, ann=ann)


def kept(original: CacheContents) -> tuple[list[Entry], np.ndarray]:
    rows = [
        i
        for i, e in enumerate(original.entries)
        if e.embedder_version == "fake@1" and (e.expires_at_ms or 0) > NOW
    ]
    return [original.entries[i] for i in rows], original.vectors[rows]


async def test_a_snapshot_is_restored_a_chunk_at_a_time_and_keeps_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(entries_module, "RESTORE_CHUNK", CHUNK)
    reads: list[int] = []
    read = SnapshotFile.rows

    def counted(self: SnapshotFile, start: int, stop: int) -> np.ndarray:
        reads.append(stop - start)
        return read(self, start, stop)

    monkeypatch.setattr(SnapshotFile, "rows", counted)
    original = contents(400)
    SnapshotStore(tmp_path).save(original, NOW)
    cache = new_cache()
    report = await Snapshotter(SnapshotStore(tmp_path), ManualClock(NOW), 0).open(cache)
    want_entries, want_vectors = kept(original)
    assert report is not None and report.restored == len(want_entries)
    assert reads and max(reads) <= CHUNK  # never the whole file's vectors at once
    big = cache._scopes[("t", "big")]
    assert big.kind == "ivf" and big._rebuild is None  # its final index from the start
    assert {index.kind for key, index in cache._scopes.items() if key[1] != "big"} == {"flat"}
    exported = cache.export_entries()
    assert list(exported.entries) == want_entries  # same entries, same LRU order
    assert np.array_equal(exported.vectors, want_vectors)
    for entry, vector in zip(want_entries, want_vectors, strict=True):
        (vid, similarity), *_ = cache._scopes[(entry.tenant, entry.scope)].search(vector, 1)
        assert cache._entries[vid] == entry and similarity == pytest.approx(1.0, abs=1e-5)


def test_an_in_memory_restore_builds_the_same_indexes() -> None:
    original = contents(400)
    streamed, whole = new_cache(), new_cache()
    streamed.restore(original)
    whole.restore(original)
    assert streamed.index_kinds() == {"ivf", "flat"}
    assert np.array_equal(streamed.export_entries().vectors, kept(original)[1])
    probe = l2_normalise(original.vectors[1:2] + 0.1)[0]
    big = ("t", "big")
    assert streamed._scopes[big].search(probe, 8) == whole._scopes[big].search(probe, 8)


def test_a_restore_that_crosses_no_threshold_stays_exact_and_evicts_over_capacity() -> None:
    original = contents(400)
    cache = SemanticCache(
        FakeEmbedder(dim=DIM), ManualClock(NOW), max_entries=50, ann=AnnSettings(10_000)
    )
    report = cache.restore(original)
    want_entries, want_vectors = kept(original)
    assert (report.restored, report.evicted) == (50, len(want_entries) - 50)
    assert cache.index_kinds() == {"flat"}
    exported = cache.export_entries()
    assert list(exported.entries) == want_entries[-50:]  # the most recently used are kept
    assert np.array_equal(exported.vectors, want_vectors[-50:])


def test_a_snapshot_cut_short_after_it_was_opened_is_an_error(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.save(contents(40), NOW)
    opened = store.open()
    assert opened is not None
    with opened:
        assert opened.rows(0, 40).shape == (40, DIM)
        with store.path.open("r+b") as file:
            file.truncate(100)  # within the header line: no vector left
        with pytest.raises(SnapshotError, match="truncated while reading its vectors"):
            opened.rows(0, 40)
