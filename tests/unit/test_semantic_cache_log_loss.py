"""A log replayed with no snapshot to hold the records before its first segment (the snapshot
removed, say after it was reported damaged) loses those acknowledged changes: said in an ERROR
line, and counted, since operators alert on metrics
(``cachemesh_semantic_cache_wal_records_lost_total``, at 0 from the start)."""

from __future__ import annotations

from pathlib import Path

from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.test_semantic_cache_persistence import new_cache, q
from tests.unit.test_semantic_cache_rules import answer

LOST = "cachemesh_semantic_cache_wal_records_lost_total"


async def _started(
    data: Path, metrics: SemanticCacheMetrics, clock: ManualClock
) -> tuple[Snapshotter, SemanticCache]:
    """A start on ``data`` (the process before it crashed: never stopped, nothing saved)."""
    snapshotter = Snapshotter(
        SnapshotStore(data),
        clock,
        0,
        WriteAheadLog(data / "wal"),
        on_log_loss=metrics.wal_records_lost,
    )
    cache = new_cache(clock)
    await snapshotter.open(cache)
    return snapshotter, cache


async def test_the_records_only_a_removed_snapshot_held_are_counted_lost(tmp_path: Path) -> None:
    clock = ManualClock()
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(10))
    assert registry.get_sample_value(LOST) == 0  # at 0 from the start
    snapshotter, cache = await _started(tmp_path, metrics, clock)
    for i in range(3):
        await cache.store(q(f"question number {i}"), answer(b"in the snapshot"))
    assert await snapshotter.save()  # holds records 1 to 3; their segment deleted
    await cache.store(q("a question after them"), answer(b"after"))  # record 4
    SnapshotStore(tmp_path).path.unlink()
    _, revived = await _started(tmp_path, metrics, clock)
    assert [e.answer.payload for e in revived.export_entries().entries] == [b"after"]
    assert registry.get_sample_value(LOST) == 3


async def test_a_whole_log_or_a_snapshot_with_its_log_loses_nothing(tmp_path: Path) -> None:
    clock = ManualClock()
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(10))
    _, cache = await _started(tmp_path, metrics, clock)  # an empty directory
    await cache.store(q("how do i reset my password"), answer(b"reset"))
    snapshotter, cache = await _started(tmp_path, metrics, clock)  # the log from record 1
    assert await snapshotter.save()
    await cache.store(q("what is the refund policy"), answer(b"refund"))
    _, revived = await _started(tmp_path, metrics, clock)  # the snapshot, the log after it
    assert len(revived) == 2
    assert registry.get_sample_value(LOST) == 0


async def test_a_snapshot_newer_than_a_copied_log_serves_its_own_state_and_keeps_new_writes(
    tmp_path: Path,
) -> None:
    """The inverse of ``LogGap``: a backup taken file by file copied wal/ first, then the
    snapshot a later save wrote. Every record of the old log is in the snapshot, so none is
    replayed: what is served is the snapshot's state (the corrected answer, tenant b's purge
    kept), nothing dropped comes back, and the Stores after the start are numbered after the
    snapshot's records, so the next start replays them."""
    import shutil

    clock = ManualClock()
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(10))
    snapshotter, cache = await _started(tmp_path, metrics, clock)
    await cache.store(q("how do i reset my password"), answer(b"old, wrong"))  # record 1
    await cache.store(q("what is the refund policy", "b"), answer(b"tenant b's"))  # 2
    shutil.copytree(tmp_path / "wal", tmp_path / "wal-backup")  # the log copied first
    await cache.store(q("how do i reset my password"), answer(b"corrected"))  # 3
    assert await cache.drop("b") == 1  # 4
    assert await snapshotter.save()  # holds records 1 to 4; their segment deleted
    shutil.rmtree(tmp_path / "wal")
    (tmp_path / "wal-backup").rename(tmp_path / "wal")  # restored beside the newer snapshot
    _, restored = await _started(tmp_path, metrics, clock)
    assert [e.answer.payload for e in restored.export_entries().entries] == [b"corrected"]
    hit = await restored.check(q("how do i reset my password"))
    assert hit.entry is not None and hit.entry.answer.payload == b"corrected"
    await restored.store(q("a question after the restore"), answer(b"after"))
    _, again = await _started(tmp_path, metrics, clock)
    payloads = sorted(e.answer.payload for e in again.export_entries().entries)
    assert payloads == [b"after", b"corrected"]
    assert registry.get_sample_value(LOST) == 0
