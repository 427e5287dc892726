"""An entry's expiry is fixed at store and kept by the log and the snapshots.

A namespace's TTL changed in the config and a restart must not move the expiry of entries
already stored; records written before entries carried ``expires_at_ms`` (log records, snapshot
formats 1 and 2) still load, with created_at + the namespace's TTL at that start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache.ann import remove_ids
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.index import AnnSettings
from services.semantic_cache.persistence import SnapshotError, SnapshotStore, encode, entry_json
from services.semantic_cache.policy import NamespacePolicy
from services.semantic_cache.query import Query
from services.semantic_cache.records import BEFORE_FORMAT_4_SCOPE, CacheContents
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WalError, WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_persistence import q
from tests.unit.test_semantic_cache_rules import answer

NEWS = "news"
QUESTION = "latest headlines today"


def new_cache(clock: ManualClock, news_ttl_s: float) -> SemanticCache:
    policy = NamespacePolicy(
        ttl_s=3_600.0, namespace_ttl_s={NEWS: news_ttl_s}, present_time_namespaces=frozenset({NEWS})
    )
    return SemanticCache(FakeEmbedder(), clock, threshold=0.5, policy=policy)


def news(question: str = QUESTION) -> Query:
    return q(question, namespace=NEWS)


async def restarted(tmp_path: Path, clock: ManualClock, news_ttl_s: float) -> SemanticCache:
    """A new process on the same data directory, configured with ``news_ttl_s``."""
    cache = new_cache(clock, news_ttl_s)
    wal = WriteAheadLog(tmp_path / "wal")
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, wal).open(cache)
    return cache


@pytest.mark.parametrize("via", ["write-ahead log", "snapshot"])
@pytest.mark.parametrize(("stored_ttl_s", "new_ttl_s"), [(60.0, 10.0), (10.0, 60.0)])
async def test_a_ttl_changed_in_the_config_does_not_move_a_stored_entry(
    tmp_path: Path, via: str, stored_ttl_s: float, new_ttl_s: float
) -> None:
    clock = ManualClock()
    cache = new_cache(clock, stored_ttl_s)
    snapshotter = Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshotter.open(cache)
    stored = await cache.store(news(), answer(b"headlines"))
    created = clock.now_ms()
    if via == "snapshot":
        await snapshotter.stop()  # saves the snapshot; the log after it is empty
    else:
        await cache.sync_journal()  # acknowledged, then the process is gone: no snapshot
    assert (tmp_path / "semantic-cache.snapshot").exists() == (via == "snapshot")

    revived = await restarted(tmp_path, clock, new_ttl_s)
    (entry,) = revived.export_entries().entries
    assert entry.entry_id == stored.entry_id
    assert entry.expires_at_ms == created + round(stored_ttl_s * 1000)
    clock.advance(s=stored_ttl_s - 0.001)
    assert (await revived.check(news())).hit  # past new_ttl_s when that is shorter
    clock.advance(ms=1)
    assert not (await revived.check(news())).hit  # stored_ttl_s old, however long new_ttl_s is
    assert len(revived) == 0


async def test_entries_stored_after_the_change_get_the_new_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    cache = new_cache(clock, 60.0)
    snapshotter = Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshotter.open(cache)
    await cache.store(news(), answer(b"old"))
    await snapshotter.stop()
    revived = await restarted(tmp_path, clock, 10.0)
    await revived.store(news("weather forecast tomorrow"), answer(b"new"))
    await revived.sync_journal()
    again = await restarted(tmp_path, clock, 10.0)  # the log carries the new entry's expiry
    expiries = {e.answer.payload: e.expires_at_ms for e in again.export_entries().entries}
    assert expiries == {b"old": clock.now_ms() + 60_000, b"new": clock.now_ms() + 10_000}


async def stored_contents(clock: ManualClock) -> CacheContents:
    """One news entry and one default-namespace entry, as the current format writes them."""
    cache = new_cache(clock, 60.0)
    await cache.store(news(), answer(b"headlines"))
    await cache.store(q("how do i reset my password"), answer(b"reset"))
    return cache.export_entries()


def without_expiry(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "expires_at_ms"}


async def test_a_log_record_without_expires_at_loads_with_created_at_plus_the_ttl(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    contents = await stored_contents(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    for entry, row in zip(contents.entries, contents.vectors, strict=True):
        vector = base64.b64encode(row.astype("<f4").tobytes()).decode()
        wal.append({"op": "store", "entry": without_expiry(entry_json(entry)), "vector": vector})
    wal.close()
    created = clock.now_ms()
    clock.advance(s=5)
    revived = await restarted(tmp_path, clock, 10.0)  # the TTL at this start migrates them
    expiries = {e.namespace: e.expires_at_ms for e in revived.export_entries().entries}
    assert expiries == {NEWS: created + 10_000, "": created + 3_600_000}
    clock.advance(s=4.999)
    assert (await revived.check(news())).hit
    clock.advance(ms=1)
    assert not (await revived.check(news())).hit


def snapshot_bytes(contents: CacheContents, version: int, *, expiry: bool = False) -> bytes:
    """A snapshot file as format ``version`` (before 4) lays it out, its entries without
    expires_at_ms, its recent purges (if any) in the header."""
    line, npy, rows, _, entries = encode(contents, 0)
    lines = [json.loads(raw) for raw in bytes(entries).splitlines()]
    body = "".join(
        json.dumps(e if expiry else without_expiry(e), separators=(",", ":")) + "\n" for e in lines
    ).encode()
    payload = bytes(npy) + bytes(rows) + body
    header = json.loads(bytes(line))
    del header["header_sha256"], header["purges_bytes"]
    header.update(version=version, entries_bytes=len(body))
    if contents.purged_at_ms:
        header["purged_at_ms"] = dict(contents.purged_at_ms)
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    if version == 1:
        del header["wal_seq"]  # format 1 predates the log and the header's own checksum
    else:
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"))
        header["header_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(header).encode() + b"\n" + payload


@pytest.mark.parametrize("version", [1, 2])
async def test_an_old_format_snapshot_loads_with_created_at_plus_the_ttl(
    tmp_path: Path, version: int
) -> None:
    clock = ManualClock()
    contents = await stored_contents(clock)
    store = SnapshotStore(tmp_path)
    store.path.write_bytes(snapshot_bytes(contents, version))
    created = clock.now_ms()
    revived = new_cache(clock, 10.0)
    report = await Snapshotter(store, clock, 0).open(revived)
    assert report is not None and report.restored == 2
    exported = revived.export_entries()
    assert {e.namespace: e.expires_at_ms for e in exported.entries} == {
        NEWS: created + 10_000,
        "": created + 3_600_000,
    }
    assert np.array_equal(exported.vectors, contents.vectors)
    clock.advance(s=10)
    assert not (await revived.check(news())).hit


@pytest.mark.parametrize("version", [1, 2, 3])
async def test_an_old_format_snapshots_entries_are_counted_of_an_older_scope(
    tmp_path: Path, version: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Every build that wrote a snapshot before format 4 looked up scope v1 (format 4 came
    before scope v2), so an upgrade from one restores entries no lookup reaches. They were
    read as v3's (the label of an entry written before entries carried their version): a
    format-3 build's 2 entries, restored by this one, were 2 misses, counted 0 of an older
    scope and said nowhere. Now they are counted and said, and a save keeps their version."""
    clock = ManualClock()
    contents = await stored_contents(clock)
    store = SnapshotStore(tmp_path)
    old_file = snapshot_bytes(contents, version, expiry=version >= 3)
    store.path.write_bytes(strip_scope_version(old_file))
    assert b"scope_version" not in store.path.read_bytes()  # as those builds wrote it
    revived = new_cache(clock, 10.0)
    with caplog.at_level(logging.INFO, logger="cachemesh.semantic_cache.persistence"):
        report = await Snapshotter(store, clock, 0).open(revived)
    assert report is not None and report.restored == 2
    assert revived.stats.old_scope == 2
    assert any("2 of the 2 entries restored" in r.getMessage() for r in caplog.records)
    versions = {e.scope_version for e in revived.export_entries().entries}
    assert versions == {BEFORE_FORMAT_4_SCOPE}


@pytest.mark.parametrize(("version", "v1"), [(3, 3), (4, 0)])
async def test_a_log_over_an_old_format_snapshot_counts_its_unstamped_entries_as_v1(
    tmp_path: Path, version: int, v1: int
) -> None:
    """The log after a snapshot of a format before 4 was written by the build that wrote the
    snapshot (scope v1), or by one that stamps its entries: an unstamped store in it is v1's,
    as the snapshot's entries are. It was counted as v3's (this build's scope): over a format-3
    snapshot of 2 entries, the log's 1 entry was counted in none of the older scope's (2 of
    the 3, the start line saying 2); now 3 of 3. Over a format-4 snapshot (or none) an
    unstamped entry is still v3's, as nothing tells it apart (the README says so). (Its scope
    hash, not this label, decides what a lookup finds: the test's entry, stored by this build
    and its label stripped, is in this build's scope.)"""
    clock = ManualClock()
    contents = await stored_contents(clock)
    store = SnapshotStore(tmp_path)
    if version == 4:  # this build's, its entries stamped v3
        store.save(contents, 0, 0)
    else:
        store.path.write_bytes(strip_scope_version(snapshot_bytes(contents, 3, expiry=True)))
    later = new_cache(clock, 60.0)
    await later.store(q("what is the capital of france"), answer(b"paris"))
    (entry,), rows = later.export_entries().entries, later.export_entries().vectors
    record = {k: v for k, v in entry_json(entry).items() if k != "scope_version"}
    vector = base64.b64encode(rows[0].astype("<f4").tobytes()).decode()
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    wal.append({"op": "store", "entry": record, "vector": vector})
    await wal.sync()
    wal.close()
    revived = await restarted(tmp_path, clock, 60.0)
    assert sum(revived.stats.entries.values()) == 3
    assert revived.stats.old_scope == v1


def strip_scope_version(raw: bytes) -> bytes:
    """A snapshot file (before format 4) whose entry lines lose their ``scope_version``, its
    checksums made again."""
    line, _, payload = raw.partition(b"\n")
    header = json.loads(line)
    entries_at = header["vectors_bytes"]
    lines = payload[entries_at:].splitlines()
    body = b"".join(
        json.dumps(
            {k: v for k, v in json.loads(e).items() if k != "scope_version"},
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for e in lines
    )
    payload = payload[:entries_at] + body
    header.update(entries_bytes=len(body), sha256=hashlib.sha256(payload).hexdigest())
    if "header_sha256" in header:
        del header["header_sha256"]
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"))
        header["header_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(header).encode() + b"\n" + payload


async def test_a_current_snapshot_without_expires_at_or_an_unknown_version_fails_loudly(
    tmp_path: Path,
) -> None:
    contents = await stored_contents(ManualClock())
    store = SnapshotStore(tmp_path)
    store.path.write_bytes(snapshot_bytes(contents, 3))
    with pytest.raises(SnapshotError, match="expires_at_ms"):
        store.load()
    store.path.write_bytes(snapshot_bytes(contents, 5, expiry=True))
    with pytest.raises(SnapshotError, match="format version 5") as refused:
        store.load()
    # a rollback: it names the newer build and what to do, the snapshot and the log together
    assert "newer build's" in str(refused.value)
    assert "move this snapshot and the wal/ directory beside it aside" in str(refused.value)


@pytest.mark.parametrize("flipped", [5, 6, 1])
async def test_a_damaged_version_digit_is_said_as_damage_not_as_a_newer_build(
    tmp_path: Path, flipped: int
) -> None:
    """A bit flip in the header's version (4 -> 5 or 6) was said to be a newer build's, with
    advice to start that build: the version was checked before the header's own digest. The
    digest covers every field but itself (a newer build's header verifies too), so it is
    checked first, and a flip to 1 (a format without a digest) is damage too, not "truncated or
    padded" under format 1's layout."""
    contents = await stored_contents(ManualClock())
    store = SnapshotStore(tmp_path)
    store.save(contents, 0, 0)
    raw = store.path.read_bytes()
    assert raw.count(b'"version":4') == 1
    store.path.write_bytes(raw.replace(b'"version":4', f'"version":{flipped}'.encode()))
    with pytest.raises(SnapshotError, match="header sha256 mismatch") as refused:
        store.load()
    assert f"format version {flipped}" in str(refused.value)
    assert "newer build" not in str(refused.value)


@pytest.mark.parametrize("bad", ["soon", None, 0])
async def test_a_log_record_with_a_bad_expires_at_is_malformed(tmp_path: Path, bad: Any) -> None:
    clock = ManualClock()
    contents = await stored_contents(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    row = base64.b64encode(contents.vectors[0].astype("<f4").tobytes()).decode()
    entry = {**entry_json(contents.entries[0]), "expires_at_ms": bad}
    wal.append({"op": "store", "entry": entry, "vector": row})
    wal.close()
    with pytest.raises(WalError, match=r"record 1 is malformed.*expires_at_ms"):
        await restarted(tmp_path, clock, 10.0)


def test_a_zero_ttl_entry_round_trips_and_one_expiring_before_creation_is_malformed() -> None:
    from services.semantic_cache.persistence import entry_from_json, entry_json
    from services.semantic_cache.records import Answer, Entry

    answer = Answer(b"a", "end_turn", 1, False)
    entry = Entry("e1", "t", "s", "", "q", answer, 1000, "emb@1", expires_at_ms=1000)  # TTL 0
    assert entry_from_json(entry_json(entry), require_expiry=True) == entry
    broken = entry_json(entry) | {"expires_at_ms": 999}
    with pytest.raises(ValueError, match="expires_at_ms"):
        entry_from_json(broken, require_expiry=True)


@pytest.mark.parametrize("ivf", [False, True])
async def test_entries_expiring_together_leave_their_scope_in_one_index_call(
    monkeypatch: pytest.MonkeyPatch, ivf: bool
) -> None:
    """Entries stored in a burst expire together, and the next lookup purges them on the event
    loop. Removed one FAISS call at a time, an exact index compacted its whole array on each:
    19,000 expired in one scope held the loop 12.5 s (10,000: 6.5 s). Now one call a scope,
    and what has not expired is served as before, the exact map and the index agreeing."""
    calls: list[int] = []

    def counted(index: Any, approximate: bool, vids: Any) -> None:
        calls.append(len(vids))
        remove_ids(index, approximate, vids)

    monkeypatch.setattr("services.semantic_cache.index.remove_ids", counted)
    clock = ManualClock()
    ann = AnnSettings(min_entries=20, nprobe=64) if ivf else None
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.99, ttl_s=3_600.0, ann=ann)
    burst = [f"burst question number {i}" for i in range(60)]
    for question in burst:
        assert (await cache.store(q(question), answer(question.encode()))).stored
    clock.advance(s=1_800)
    kept = [f"kept question number {i}" for i in range(30)]
    for question in kept:
        assert (await cache.store(q(question), answer(question.encode()))).stored
    cache.wait_for_indexes()
    assert cache.index_kinds() == {"ivf" if ivf else "flat"}

    clock.advance(s=1_800)  # the burst is an hour old: expired, the others not
    first = await cache.check(q(kept[0]))
    assert calls == [len(burst)]  # one call for the scope's 60, not 60 calls
    assert cache.stats.expirations == len(burst)
    assert len(cache) == len(kept)
    assert first.hit and first.exact
    for question in kept:
        found = await cache.check(q(question))
        assert found.hit and found.exact and found.entry is not None
        assert found.entry.answer.payload == question.encode()
    for question in burst:
        assert not (await cache.check(q(question))).hit
