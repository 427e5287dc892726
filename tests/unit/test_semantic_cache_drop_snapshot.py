"""A drop is followed by a snapshot soon: the dropped questions and answers leave the data
directory (the snapshot file and the write-ahead log hold them until the next save, 60 s by
default, and with SEMANTIC_CACHE_SNAPSHOT_S=0 until a clean stop)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.test_semantic_cache_persistence import TTL_S, new_cache, q
from tests.unit.test_semantic_cache_rules import answer

QUESTION = "what is the door code of the east warehouse"
ANSWER = b"the code is 4711-secret"


def on_disk(directory: Path) -> list[str]:
    """The files under ``directory`` holding the question or the answer (as the log holds
    it: base64) or the answer's bytes."""
    marks = (QUESTION.encode(), base64.b64encode(ANSWER), ANSWER)
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and any(mark in path.read_bytes() for mark in marks)
    )


@pytest.mark.parametrize("target", ["all", "namespace", "entry"])
async def test_a_drop_takes_the_dropped_text_off_the_disk_soon(tmp_path: Path, target: str) -> None:
    clock = ManualClock()
    cache = new_cache(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, wal, save_after_drop_s=0)
    await snapshots.open(cache)
    api = SemanticCacheApi(cache, on_drop=snapshots.dropped)
    await cache.store(q("a question that stays"), answer(b"kept"))
    await snapshots.save()  # the older snapshot holds the entry too
    entry = await cache.store(q(QUESTION), answer(ANSWER))
    await snapshots.save()
    assert on_disk(tmp_path)  # the snapshot holds it
    await cache.store(q("another question after it"), answer(b"later"))  # it is in the log
    drop = sc.DropRequest(tenant="a")
    if target == "namespace":
        drop.namespace = ""
    elif target == "entry":
        drop.entry_id = entry.entry_id
    assert (await api.drop(drop)).dropped >= 1
    await snapshots.settled()
    assert on_disk(tmp_path) == []
    await snapshots.stop()


@pytest.mark.parametrize("target", ["all", "entry"])
async def test_a_drop_of_entries_already_expired_takes_their_text_off_the_disk_too(
    tmp_path: Path, target: str
) -> None:
    """Expired but not yet collected, they count as 0 dropped, yet the log still holds their
    text. Before: no snapshot followed a Drop that counted 0, and the log kept it until the
    next periodic save (with SEMANTIC_CACHE_SNAPSHOT_S=0, until a clean stop)."""
    clock = ManualClock()
    cache = new_cache(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, wal, save_after_drop_s=0)
    await snapshots.open(cache)
    api = SemanticCacheApi(cache, on_drop=snapshots.dropped)
    entry = await cache.store(q(QUESTION), answer(ANSWER))
    clock.advance(s=TTL_S + 1)  # expired, not yet collected
    drop = sc.DropRequest(tenant="a", entry_id=entry.entry_id if target == "entry" else "")
    assert (await api.drop(drop)).dropped == 0
    await snapshots.settled()
    assert on_disk(tmp_path) == []
    await snapshots.stop()


async def test_drops_in_a_burst_share_one_snapshot(tmp_path: Path) -> None:
    clock = ManualClock()
    cache = new_cache(clock)
    saves: list[float] = []
    snapshots = Snapshotter(
        SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"), on_save=saves.append
    )
    await snapshots.open(cache)
    api = SemanticCacheApi(cache, on_drop=snapshots.dropped)
    for tenant in ("a", "b", "c"):
        await cache.store(q(QUESTION, tenant), answer(ANSWER))
    for tenant in ("a", "b", "c"):
        assert (await api.drop(sc.DropRequest(tenant=tenant))).dropped == 1
    await snapshots.stop()  # within the 5 s: the last save covers them, and is the only one
    assert len(saves) == 1
    assert on_disk(tmp_path) == []


@pytest.mark.parametrize("when", ["periodic", "stop"])
async def test_an_expired_entrys_text_leaves_the_disk_without_traffic(
    tmp_path: Path, when: str
) -> None:
    """An entry whose TTL ended on a quiet cache (no Lookup or Store to collect it): the next
    save (a period's, or the clean stop's) collects it and writes a snapshot without it.
    Before, the save found no change and skipped, so its question and answer stayed in the
    snapshot until traffic came (1 of 1, after the stop too)."""
    clock = ManualClock()
    cache = new_cache(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, wal, save_after_drop_s=0)
    await snapshots.open(cache)
    await cache.store(q("a question that stays"), answer(b"kept"))
    clock.advance(s=TTL_S // 2)
    await cache.store(q(QUESTION), answer(ANSWER))
    await snapshots.save()
    assert on_disk(tmp_path) == ["semantic-cache.snapshot"]
    clock.advance(s=TTL_S // 2 + 1)  # the first entry expired, the marked one not yet
    assert await snapshots.save()  # a change: the expired one collected
    assert on_disk(tmp_path) == ["semantic-cache.snapshot"]
    clock.advance(s=TTL_S // 2)  # the marked one expired too; no Lookup or Store since
    if when == "periodic":
        assert await snapshots.save()
        assert on_disk(tmp_path) == []
    await snapshots.stop()
    assert on_disk(tmp_path) == []
    assert cache.stats.expirations == 2
