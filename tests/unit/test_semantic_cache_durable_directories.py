"""A directory the service creates for its data is durable in its parent before anything in it
is acknowledged: fsyncing a new file (or a log segment's directory) does not make the
directory's own entry in its parent durable, so after a power cut a new data directory, or
its ``wal`` directory, could vanish with the acknowledged Stores of its first segment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common import private_files
from services.common.clock import ManualClock
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WriteAheadLog
from tests.fsyncs import record_fsyncs
from tests.unit.test_semantic_cache_persistence import new_cache, q
from tests.unit.test_semantic_cache_rules import answer


def test_each_directory_made_is_fsynced_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = record_fsyncs(monkeypatch)
    private_files.private_directory(tmp_path / "srv" / "cachemesh" / "l1")
    assert {tmp_path, tmp_path / "srv", tmp_path / "srv" / "cachemesh"} <= set(synced), synced
    assert (tmp_path / "srv" / "cachemesh" / "l1").is_dir()


def test_a_directory_already_there_costs_no_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "l1").mkdir()
    synced = record_fsyncs(monkeypatch)
    private_files.private_directory(tmp_path / "l1")
    assert synced == []


async def test_a_new_data_directory_is_durable_before_the_first_store_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start a fresh ``SEMANTIC_CACHE_DATA_DIR`` (and its parent) is made in, then one
    Store: every directory on the way to its log segment is in its parent for good."""
    data_dir = tmp_path / "volume" / "semantic-cache"
    synced = record_fsyncs(monkeypatch)
    store = SnapshotStore(data_dir)
    store.prepare()
    clock = ManualClock()
    cache = new_cache(clock)
    snapshotter = Snapshotter(store, clock, 0, WriteAheadLog(data_dir / "wal"))
    await snapshotter.open(cache)
    await cache.store(q("how do i reset my password"), answer(b"reset"))
    acknowledged = list(synced)
    segment = max((data_dir / "wal").glob("*.log"), key=lambda p: int(p.stem))
    for made in (tmp_path / "volume", data_dir, data_dir / "wal", segment):
        assert made.parent in acknowledged, f"{made} is not durable in {made.parent}"
    assert acknowledged[-1] == segment  # the Store's own record
    await snapshotter.stop()
    store.close()


def test_a_parent_this_process_cannot_read_is_a_warning_not_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The outermost directory made sits in a parent that is not the service's, which it may
    write but not read (mode 0733): opening it to fsync is refused. Before: the start failed
    after the directory was made (and the next start passed); now it warns and goes on."""
    real_open = os.open

    def open_refused(path: str | Path, flags: int, *args: int) -> int:
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_refused)
    private_files.private_directory(tmp_path / "drop" / "l1")
    assert (tmp_path / "drop" / "l1").is_dir()
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"{tmp_path / 'drop'} was made in {tmp_path}" in warning.getMessage()
