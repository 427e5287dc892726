"""The purge guard's recent purges in a snapshot: thousands of tenants purged within its
window (an operator purging every tenant's L1 after a system-prompt change) survive a
restart, and snapshots that carried them in their header (before format 4) still load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.clock import ManualClock
from services.semantic_cache.persistence import SnapshotError, SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from tests.unit.test_semantic_cache_expiry import snapshot_bytes
from tests.unit.test_semantic_cache_persistence import filled, new_cache, q
from tests.unit.test_semantic_cache_rules import answer

# 13,000 tenant names of 64 characters (keyfile's longest): ~1.1 MB of recent purges
TENANTS = [f"tenant-{i:06d}-" + "x" * 50 for i in range(13_000)]


async def test_the_purges_of_thousands_of_tenants_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    cache = new_cache(clock)
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0)
    await snapshots.open(cache)
    assert (await cache.store(q("what is the refund window", "keeper"), answer(b"14d"))).stored
    late = TENANTS[-1]
    asked = dataclasses.replace(q("how long do refunds take", late), request_id="req-1")
    assert not (await cache.check(asked)).hit  # its model call starts
    for tenant in TENANTS:
        await cache.drop(tenant)
    await snapshots.stop()  # SIGTERM within the guard's window: the last snapshot
    revived = new_cache(clock)
    report = await Snapshotter(SnapshotStore(tmp_path), clock, 0).open(revived)
    assert report is not None and report.restored == 1
    assert (await revived.check(q("what is the refund window", "keeper"))).hit
    stored = await revived.store(asked, answer(b"14 days"))  # the call's answer predates it
    assert not stored.stored and "after this request's lookup" in stored.skip_reason


async def test_a_format_3_snapshot_with_thousands_of_purges_in_its_header_loads(
    tmp_path: Path,
) -> None:
    """Builds before format 4 wrote such a header (over 1 MiB) and could not read it back."""
    contents = (await filled()).export_entries()
    purged = {tenant: 1_700_000_000_000 + i for i, tenant in enumerate(TENANTS)}
    old = snapshot_bytes(dataclasses.replace(contents, purged_at_ms=purged), 3, expiry=True)
    assert old.index(b"\n") > 1 << 20
    store = SnapshotStore(tmp_path)
    store.path.write_bytes(old)
    snapshot = store.load()
    assert snapshot is not None
    assert snapshot.contents.purged_at_ms == purged
    assert snapshot.contents.entries == contents.entries


def test_the_recent_purges_are_in_the_checksummed_payload(tmp_path: Path) -> None:
    purged = {tenant: 1_700_000_000_000 for tenant in TENANTS}
    contents = dataclasses.replace(new_cache().export_entries(), purged_at_ms=purged)
    store = SnapshotStore(tmp_path)
    store.save(contents, 0)
    loaded = store.load()
    assert loaded is not None and loaded.contents.purged_at_ms == purged
    data = bytearray(store.path.read_bytes())
    assert data.index(b"\n") < 1024  # the header: a few hundred bytes, however many purges
    at = data.index(TENANTS[5_000].encode())
    data[at] ^= 0x01  # another tenant's purge
    store.path.write_bytes(data)
    with pytest.raises(SnapshotError, match="sha256 mismatch"):
        store.load()
