"""semantic-cache's durable state under a failing disk: the log's directory removed while it
runs, snapshots that cannot be written (a full disk), a tenant policy the disk refuses.

The disk is simulated: a snapshot store whose ``save`` fails with ENOSPC while ``full``, the
policy file's fsync failing as a full filesystem's write does.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path

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
from services.semantic_cache.records import CacheContents
from services.semantic_cache.snapshotter import FAILURE_LOG_INTERVAL_S, Snapshotter
from services.semantic_cache.tenant_policy import FILE_NAME, TenantPolicies
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

QUESTIONS = [
    "what are your opening hours",
    "how do i reset my password",
    "where is my parcel",
    "can i pay by card",
    "do you ship abroad",
]
SECRET = "the door code is 4711-secret"
LOGGER = "cachemesh.semantic_cache.persistence"
FAILURES = "cachemesh_semantic_cache_snapshot_failures_total"


class FullDiskStore(SnapshotStore):
    """A snapshot store on a disk with no room left while ``full``."""

    full = False

    def save(self, contents: CacheContents, created_at_ms: int, wal_seq: int = 0) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().save(contents, created_at_ms, wal_seq)


class Shard:
    """A semantic-cache with a data directory: its API, cache, log, snapshots and metrics."""

    def __init__(self, directory: Path, clock: ManualClock) -> None:
        self.seconds = 0.0  # the snapshotter's monotonic timer
        self.registry = CollectorRegistry()
        metrics = SemanticCacheMetrics(self.registry, TenantLabels(10))
        self.cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8)
        self.wal = WriteAheadLog(directory / "wal")
        self.store = FullDiskStore(directory)
        self.snapshots = Snapshotter(
            self.store,
            clock,
            0,
            self.wal,
            timer=lambda: self.seconds,
            save_after_drop_s=0,
            on_failure=metrics.snapshot_failed,
        )
        self.api = SemanticCacheApi(self.cache, on_drop=self.snapshots.dropped)

    @classmethod
    async def open(cls, directory: Path, clock: ManualClock) -> Shard:
        shard = cls(directory, clock)
        await shard.snapshots.open(shard.cache)
        return shard

    async def store_answer(self, question: str, text: str, tenant: str = "acme") -> bool:
        answer = sc.CachedAnswer(content=[pb.ContentBlock(text=text)], stop_reason="end_turn")
        request = sc.StoreRequest(tenant=tenant, request=make_request(question), answer=answer)
        return (await self.api.store(request)).stored

    def entries(self, tenant: str = "acme") -> int:
        (stats,) = self.api.stats(sc.L1StatsRequest(tenant=tenant)).tenants
        return stats.entries

    def failures(self) -> float | None:
        return self.registry.get_sample_value(FAILURES)


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_log_directory_removed_while_serving_is_made_again_and_nothing_acknowledged_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``rm -rf <data>/wal`` while it runs: the Stores after it are acknowledged (their records
    go to the open segment, now unlinked); the next snapshot makes the directory again (0700,
    one ERROR saying so) and holds them, so a crash after it loses none."""
    clock = ManualClock()
    shard = await Shard.open(tmp_path, clock)
    assert await shard.store_answer(QUESTIONS[0], "kept before")
    shutil.rmtree(tmp_path / "wal")
    for i, question in enumerate(QUESTIONS[1:]):
        assert await shard.store_answer(question, f"acknowledged #{i}")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert await shard.snapshots.save()
        assert await shard.store_answer("is there a student discount", "after the repair")
        assert await shard.snapshots.save()
    (line,) = errors(caplog)
    assert str(tmp_path / "wal") in line.getMessage() and "made it again" in line.getMessage()
    assert stat.S_IMODE((tmp_path / "wal").stat().st_mode) == 0o700
    crashed = await Shard.open(tmp_path, clock)  # kill -9: the snapshot, then the log
    assert crashed.entries() == len(QUESTIONS) + 1


def secret_on_disk(directory: Path) -> list[str]:
    """The files under ``directory`` holding tenant-b's questions (its answers are encoded)."""
    marks = (QUESTIONS[0].encode(), QUESTIONS[1].encode())
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and any(mark in path.read_bytes() for mark in marks)
    )


async def test_failing_snapshots_are_counted_and_said_once_a_while_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A purge on a full disk: the snapshot after it fails, so the purged text stays in the
    snapshot file. Each failure is counted (the series at 0 from the start); the log says it
    once, with the reason and no traceback, then again once the interval has passed with how
    many failed meanwhile; once space is freed the next save takes the text off the disk."""
    clock = ManualClock()
    shard = await Shard.open(tmp_path, clock)
    assert shard.failures() == 0
    assert await shard.store_answer(QUESTIONS[0], SECRET, tenant="tenant-b")
    assert await shard.store_answer(QUESTIONS[1], SECRET + " too", tenant="tenant-b")
    assert await shard.snapshots.save()
    shard.store.full = True
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert (await shard.api.drop(sc.DropRequest(tenant="tenant-b"))).dropped == 2
        await shard.snapshots.settled()
        for _ in range(3):  # the next periods, or the next drops
            await shard.api.drop(sc.DropRequest(tenant="tenant-b"))
            await shard.snapshots.settled()
        assert shard.failures() == 4
        assert "semantic-cache.snapshot" in secret_on_disk(tmp_path)  # the purged text stays
        (first,) = errors(caplog)
        assert first.exc_info is None  # the reason, not a traceback
        message = first.getMessage()
        assert "No space left on device" in message and "SEMANTIC_CACHE_DATA_DIR" in message
        assert "dropped" in message  # what it means for a purge
        shard.seconds += FAILURE_LOG_INTERVAL_S
        await shard.api.drop(sc.DropRequest(tenant="tenant-b"))
        await shard.snapshots.settled()
        assert shard.failures() == 5
        assert len(errors(caplog)) == 2 and "5 in a row" in errors(caplog)[1].getMessage()
        shard.store.full = False
        await shard.api.drop(sc.DropRequest(tenant="tenant-b"))
        await shard.snapshots.settled()
    assert shard.failures() == 5
    assert secret_on_disk(tmp_path) == []
    assert any("saved again" in r.getMessage() for r in caplog.records)


async def test_a_policy_the_disk_refuses_is_unavailable_not_applied_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SetPolicy on a full disk: UNAVAILABLE naming SEMANTIC_CACHE_DATA_DIR and the reason
    (not INTERNAL), the policy not applied, the file as it was, no temp file left behind."""
    path = tmp_path / FILE_NAME
    policies = TenantPolicies(path)
    registry = CollectorRegistry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(10))
    cache = SemanticCache(FakeEmbedder(), ManualClock())
    api = SemanticCacheApi(cache, policies=policies, metrics=metrics)
    await api.set_policy(sc.SetL1PolicyRequest(tenant="acme", default_ttl_s=60))
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RequestError) as caught:
        await api.set_policy(sc.SetL1PolicyRequest(tenant="acme", l1_enabled=False))
    monkeypatch.undo()
    assert caught.value.code == Code.UNAVAILABLE
    message = caught.value.message
    assert "SEMANTIC_CACHE_DATA_DIR" in message and "No space left on device" in message
    assert str(tmp_path) not in message
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]
    assert path.read_bytes() == before
    refused = "cachemesh_semantic_cache_writes_refused_total"
    assert registry.get_sample_value(refused, {"write": "policy"}) == 1
    policy = await api.get_policy(sc.L1PolicyRequest(tenant="acme"))
    assert policy.l1_enabled and policy.default_ttl_s == 60
