"""A full disk under the write-ahead log: a Store or Drop it refuses is refused, not applied.

The disk is simulated: the log's file is wrapped so a write past ``room`` bytes writes what
fits, then fails with ENOSPC, as a full filesystem does (a partial record on disk).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.common.metrics import TenantLabels
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import NotDurable, WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

QUESTIONS = ["what are your opening hours", "how do i reset my password", "where is my parcel"]


class FullDisk:
    """The log's open segment with ``room`` bytes left on its filesystem."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes | bytearray | memoryview) -> int:
        data = bytes(data)
        fits = data[: max(0, self.room)]
        if fits:
            os.write(self.real.fileno(), fits)
            self.room -= len(fits)
        if len(fits) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return int(self.real.fileno())

    def close(self) -> None:
        self.real.close()


def fill(wal: WriteAheadLog, room: int = 0) -> FullDisk:
    real = wal._out
    assert real is not None
    real.flush()
    disk = FullDisk(real, room)
    wal._out = disk  # type: ignore[assignment]
    return disk


class Shard:
    """A semantic-cache with a data directory: its API, cache, log and snapshots."""

    def __init__(self, directory: Path, clock: ManualClock) -> None:
        self.cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8)
        self.wal = WriteAheadLog(directory / "wal")
        self.snapshots = Snapshotter(SnapshotStore(directory), clock, 0, self.wal)
        self.registry = CollectorRegistry()
        metrics = SemanticCacheMetrics(self.registry, TenantLabels(10))
        self.api = SemanticCacheApi(self.cache, metrics=metrics)

    @classmethod
    async def open(cls, directory: Path, clock: ManualClock) -> Shard:
        shard = cls(directory, clock)
        await shard.snapshots.open(shard.cache)
        return shard

    async def store(self, question: str, text: str, tenant: str = "acme") -> sc.StoreResponse:
        answer = sc.CachedAnswer(content=[pb.ContentBlock(text=text)], stop_reason="end_turn")
        request = sc.StoreRequest(tenant=tenant, request=make_request(question), answer=answer)
        return await self.api.store(request)

    async def served(self, question: str, tenant: str = "acme") -> str | None:
        lookup = sc.LookupRequest(tenant=tenant, request=make_request(question))
        reply = await self.api.lookup(lookup, None)
        return reply.answer.content[0].text if reply.hit else None

    def refused(self, write: str) -> float | None:
        """``cachemesh_semantic_cache_writes_refused_total{write}``."""
        name = "cachemesh_semantic_cache_writes_refused_total"
        return self.registry.get_sample_value(name, {"write": write})

    def entries(self, tenant: str = "acme") -> int:
        (stats,) = self.api.stats(sc.L1StatsRequest(tenant=tenant)).tenants
        return stats.entries


async def refused(call: Any) -> str:
    with pytest.raises(RequestError) as caught:
        await call
    assert caught.value.code == Code.UNAVAILABLE
    return caught.value.message


async def test_a_purge_the_full_disk_refuses_is_not_applied_nor_brought_back(
    tmp_path: Path,
) -> None:
    """Drop on a full disk: it says so (UNAVAILABLE, naming the disk), and the entries are
    still there, served and counted, now and after a crash: never a purge that looks done
    and is undone by a restart. Space freed and a snapshot saved, the purge goes through."""
    clock = ManualClock()
    shard = await Shard.open(tmp_path, clock)
    for i, question in enumerate(QUESTIONS):
        assert (await shard.store(question, f"9-5 #{i}")).stored
    assert shard.refused("drop") == 0  # a series from the start
    disk = fill(shard.wal)
    message = await refused(shard.api.drop(sc.DropRequest(tenant="acme")))
    assert "No space left on device" in message and "SEMANTIC_CACHE_DATA_DIR" in message
    assert shard.refused("drop") == 1 and shard.refused("store") == 0
    assert shard.entries() == 3 and await shard.served(QUESTIONS[0]) == "9-5 #0"
    crashed = await Shard.open(tmp_path, clock)  # kill -9: no snapshot, the log replayed
    assert crashed.entries() == 3
    served = [await crashed.served(question) for question in QUESTIONS]
    assert served == ["9-5 #0", "9-5 #1", "9-5 #2"]
    disk.room = 1 << 30  # the operator frees space
    await refused(shard.api.drop(sc.DropRequest(tenant="acme")))  # not before a snapshot
    assert await shard.snapshots.save()  # nothing changed, yet it is saved: the log failed
    assert (await shard.api.drop(sc.DropRequest(tenant="acme"))).dropped == 3
    assert shard.entries() == 0
    revived = await Shard.open(tmp_path, clock)
    assert revived.entries() == 0 and await revived.served(QUESTIONS[0]) is None


@pytest.mark.parametrize("room", [0, 10, 100])
async def test_a_store_the_full_disk_refuses_is_never_served(tmp_path: Path, room: int) -> None:
    """Store on a full disk (its record cut anywhere): refused, not served meanwhile, and not
    after a crash either; the acknowledged entries are, and the service starts."""
    clock = ManualClock()
    shard = await Shard.open(tmp_path, clock)
    assert (await shard.store(QUESTIONS[0], "kept")).stored
    fill(shard.wal, room)
    message = await refused(shard.store(QUESTIONS[1], "refused"))
    assert "No space left on device" in message
    await refused(shard.store(QUESTIONS[2], "refused too"))  # the log stays failed
    assert shard.refused("store") == 2 and shard.refused("drop") == 0
    assert shard.entries() == 1
    assert await shard.served(QUESTIONS[1]) is None and await shard.served(QUESTIONS[2]) is None
    crashed = await Shard.open(tmp_path, clock)
    assert crashed.entries() == 1 and await crashed.served(QUESTIONS[0]) == "kept"
    assert await crashed.served(QUESTIONS[1]) is None


async def test_records_a_failed_write_left_whole_on_disk_are_never_replayed(
    tmp_path: Path,
) -> None:
    """One flush writes several records; the disk fills inside the second: the first is whole
    on disk but was never acknowledged, so it is cut off with the rest, and until a snapshot
    nothing more is written after it."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append({"op": "x", "n": 1})
    await wal.sync()
    size = sum(p.stat().st_size for p in wal.segments())
    wal.append({"op": "x", "n": 2})
    wal.append({"op": "x", "n": 3})
    fill(wal, room=size + 10)  # record 2 fits whole (it is as long as record 1), 3 does not
    with pytest.raises(NotDurable, match="No space left on device"):
        await wal.sync()
    with pytest.raises(NotDurable):
        wal.append({"op": "x", "n": 4})  # refused: nothing more goes after the failure
    assert sum(p.stat().st_size for p in wal.segments()) == size
    assert [r["n"] for r in WriteAheadLog(tmp_path).open()] == [1]


async def test_changes_are_applied_once_durable_in_the_logs_order(tmp_path: Path) -> None:
    """A change is applied (made visible) only once its record is durable: by a sync, or by a
    rotation before its copy; never when its record is lost."""
    applied: list[int] = []
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append({"op": "x"}, lambda: applied.append(1))
    wal.append({"op": "x"}, lambda: applied.append(2))
    assert applied == []
    await wal.sync()
    assert applied == [1, 2]
    wal.append({"op": "x"}, lambda: applied.append(3))
    copied, last = await wal.rotate(lambda: list(applied))
    assert copied == [1, 2, 3] and last == 3
    fill(wal)
    wal.append({"op": "x"}, lambda: applied.append(4))
    with pytest.raises(NotDurable):
        await wal.sync()
    await wal.rotate(lambda: None)
    assert applied == [1, 2, 3]


@pytest.mark.parametrize("fsync_fails", [True, False])
async def test_a_store_cancelled_during_its_fsync_leaves_the_fsyncs_outcome_to_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync_fails: bool
) -> None:
    """A Store whose caller goes (its deadline, its client) while its record's fsync runs in
    a worker thread: the thread cannot be stopped, and its outcome is the log's all the same.
    Failed (EIO): the log fails, the next Store is refused and the cancelled one is never
    served, nor after a crash. Before, the failure went unread: the next Store was
    acknowledged (an fsync after a failed one does not report the pages the kernel dropped)
    and the cancelled one served. Succeeded: its entry is applied now, as a restart applies
    it (before, only at the next Store's sync)."""
    clock = ManualClock()
    shard = await Shard.open(tmp_path, clock)
    entered, go = threading.Event(), threading.Event()
    real_fsync = os.fsync
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the cancelled Store's
            entered.set()
            assert go.wait(10)
            if fsync_fails:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    cancelled = asyncio.ensure_future(shard.store(QUESTIONS[0], "cancelled"))
    assert await asyncio.to_thread(entered.wait, 10)  # its fsync runs in its thread
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    go.set()
    async with shard.wal._sync_lock:  # the cancelled Store's sync has ended (if it held it)
        assert shard.wal.failed is fsync_fails
        assert await shard.served(QUESTIONS[0]) == (None if fsync_fails else "cancelled")
    if fsync_fails:
        message = await refused(shard.store(QUESTIONS[1], "after"))
        assert "Input/output error" in message
        assert await shard.served(QUESTIONS[0]) is None
    else:
        assert (await shard.store(QUESTIONS[1], "after")).stored
    monkeypatch.setattr(os, "fsync", real_fsync)
    crashed = await Shard.open(tmp_path, clock)
    expected = None if fsync_fails else "cancelled"
    assert await crashed.served(QUESTIONS[0]) == expected
