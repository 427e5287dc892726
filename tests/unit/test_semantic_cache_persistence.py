"""Snapshots of the semantic cache: round trip, what is skipped, damaged files, atomic writes."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.model.providers.progress import tool_use_chunk
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.persistence import (
    LOCK_NAME,
    SNAPSHOT_NAME,
    DirectoryInUse,
    Snapshot,
    SnapshotError,
    SnapshotStore,
)
from services.semantic_cache.policy import NamespacePolicy
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import Answer
from services.semantic_cache.snapshotter import Snapshotter
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

TTL_S = 60.0

# (tenant, question, request options): several tenants, namespaces and scopes
STORED: list[tuple[str, str, dict[str, Any]]] = [
    ("a", "how do i reset my password", {}),
    ("a", "how do i delete my account", {}),
    ("a", "how do i reset my password", {"namespace": "billing"}),
    ("a", "how do i reset my password", {"system": "You are a pirate."}),
    ("b", "how do i reset my password", {}),
    ("b", "what is the refund policy", {"temperature": 0.0}),
]


def q(question: str, tenant: str = "a", **kwargs: Any) -> Query:
    return query_from_request(tenant, make_request(question, **kwargs))


def stored(i: int) -> Query:
    tenant, question, options = STORED[i]
    return q(question, tenant, **options)


def new_cache(
    clock: ManualClock | None = None, *, version: str = "fake@1", max_entries: int = 100
) -> SemanticCache:
    return SemanticCache(
        FakeEmbedder(version=version),
        clock or ManualClock(),
        threshold=0.5,
        ttl_s=TTL_S,
        max_entries=max_entries,
    )


async def filled(clock: ManualClock | None = None) -> SemanticCache:
    cache = new_cache(clock)
    for i, (tenant, question, options) in enumerate(STORED):
        answer = Answer(f"answer {i}".encode(), "end_turn", 10 + i, False)
        assert (await cache.store(q(question, tenant, **options), answer)).stored
    return cache


def round_trip(cache: SemanticCache, directory: Path) -> Snapshot:
    store = SnapshotStore(directory)
    store.save(cache.export_entries(), 1_700_000_000_000)
    snapshot = store.load()
    assert snapshot is not None
    return snapshot


async def test_a_restored_cache_serves_the_same_hits_in_the_same_lru_order(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    cache = await filled(clock)
    assert (await cache.check(stored(0))).hit  # now the most recently used
    before = cache.export_entries()
    restored = new_cache(clock)
    report = restored.restore(round_trip(cache, tmp_path).contents)
    assert (report.restored, report.expired, report.other_embedder) == (len(STORED), 0, 0)
    after = restored.export_entries()
    assert after.entries == before.entries  # same entries (ids, answers, ages), same order
    assert np.array_equal(after.vectors, before.vectors)
    for tenant, question, options in STORED:
        for text in (question, f"please tell me {question} quickly"):
            old = await cache.check(q(text, tenant, **options))
            new = await restored.check(q(text, tenant, **options))
            assert new.hit and new.entry == old.entry
            assert (new.similarity, new.exact) == (old.similarity, old.exact)
    assert not (await restored.check(q("how do i reset my password", "c"))).hit


async def test_lru_order_survives_so_eviction_picks_the_same_entry(tmp_path: Path) -> None:
    cache = await filled()
    assert (await cache.check(stored(0))).hit  # STORED[1] is now the least recent
    restored = new_cache(max_entries=len(STORED))
    restored.restore(round_trip(cache, tmp_path).contents)
    await restored.store(q("a brand new question"), Answer(b"n", "end_turn", 1, False))
    assert not (await restored.check(stored(1))).exact  # evicted (a paraphrase may match)
    assert (await restored.check(stored(0))).exact
    assert (await restored.check(stored(2))).exact
    assert len(restored) == len(STORED)


def held(cache: SemanticCache) -> list[tuple[str, str]]:
    """(tenant, question) of every entry, least recently used first."""
    return [(e.tenant, e.query) for e in cache.export_entries().entries]


async def test_a_restore_over_capacity_evicts_from_the_tenant_holding_the_most(
    tmp_path: Path,
) -> None:
    """A snapshot of b's 3 older entries and a's 7 newer ones restored into room for 6: a
    loses its 4 least recently used, b keeps all 3."""
    cache = new_cache()
    for i in range(3):
        await cache.store(q(f"b question {i} about x{i}", "b"), Answer(b"b", "end_turn", 1, False))
    for i in range(7):
        await cache.store(q(f"a question {i} about y{i}"), Answer(b"a", "end_turn", 1, False))
    restored = new_cache(max_entries=6)
    report = restored.restore(round_trip(cache, tmp_path).contents)
    assert (report.restored, report.evicted) == (6, 4)
    assert held(restored) == held(cache)[:3] + held(cache)[-3:]
    assert restored.stats.entries == {"a": 3, "b": 3} and restored.stats.evictions == 4


async def test_a_restored_cache_evicts_what_the_original_would(tmp_path: Path) -> None:
    """Each tenant's LRU order and the order between tenants survive a restore: the same
    later stores evict the same entries from both."""
    clock = ManualClock()
    cache = new_cache(clock, max_entries=6)
    for i in range(6):
        tenant = "ab"[i % 2]
        await cache.store(q(f"question {i} about x{i}", tenant), Answer(b"x", "end_turn", 1, False))
    assert (await cache.check(q("question 0 about x0", "a"))).exact  # a's newest now
    assert (await cache.check(q("question 3 about x3", "b"))).exact  # b's newest now
    restored = new_cache(clock, max_entries=6)
    restored.restore(round_trip(cache, tmp_path).contents)
    assert held(restored) == held(cache)
    for tenant, question in [("a", "new a one"), ("c", "new c one"), ("a", "new a two")]:
        for one in (cache, restored):
            await one.store(q(question, tenant), Answer(b"n", "end_turn", 1, False))
    assert held(restored) == held(cache)
    assert cache.stats.entries == {"a": 3, "b": 2, "c": 1}


async def test_entries_expired_by_the_clock_are_skipped(tmp_path: Path) -> None:
    clock = ManualClock()
    cache = new_cache(clock)
    await cache.store(q("old question"), Answer(b"old", "end_turn", 1, False))
    clock.advance(s=10)
    await cache.store(q("new question"), Answer(b"new", "end_turn", 1, False))
    snapshot = round_trip(cache, tmp_path)
    clock.advance(s=TTL_S - 10)  # the old one is exactly TTL old now
    restored = new_cache(clock)
    report = restored.restore(snapshot.contents)
    assert (report.restored, report.expired) == (1, 1)
    assert not (await restored.check(q("old question"))).hit
    assert (await restored.check(q("new question"))).hit


async def test_a_tool_call_with_unparsed_arguments_stored_before_is_not_served(
    tmp_path: Path,
) -> None:
    """An entry held from before the Store read a tool call's arguments (its answer's record
    says nothing of them) is read again when loaded: one whose call the model wrote as broken
    JSON (``{"_unparsed_arguments": ...}``) is not served, as it would not be stored now."""
    policy = NamespacePolicy(tool_use_namespaces=frozenset({"agent"}))
    clock = ManualClock()
    caches = [
        SemanticCache(FakeEmbedder(), clock, threshold=0.5, ttl_s=TTL_S, policy=policy)
        for _ in range(2)
    ]
    calls = [("open config file", '{"path": "/etc/app.co'), ("tail error log", '{"path": "/l"}')]
    for question, arguments in calls:
        payload = sc.CachedAnswer(
            content=[tool_use_chunk("call_1", "read_file", arguments).block],
            stop_reason="tool_use",
            output_tokens=9,
        ).SerializeToString()
        kept = Answer(payload, "tool_use", 9, has_tool_use=True, has_text=False)
        assert (await caches[0].store(q(question, namespace="agent"), kept)).stored
    caches[1].restore(round_trip(caches[0], tmp_path).contents)
    assert len(caches[1]) == 2
    assert not (await caches[1].check(q("open config file", namespace="agent"))).hit
    assert (await caches[1].check(q("tail error log", namespace="agent"))).hit


async def test_entries_of_another_embedder_version_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SnapshotStore(tmp_path)
    store.save((await filled()).export_entries(), 0)
    cache = new_cache(version="fake@2")
    with caplog.at_level(logging.WARNING):
        report = await Snapshotter(store, ManualClock(), 0).open(cache)
    assert report is not None and (report.restored, report.other_embedder) == (0, len(STORED))
    assert len(cache) == 0
    assert f"skipped {len(STORED)} entries of embedder fake@1" in caplog.text


@pytest.mark.parametrize("where", ["header", "vectors", "last byte"])
async def test_a_flipped_byte_is_an_error_naming_the_file(tmp_path: Path, where: str) -> None:
    store = SnapshotStore(tmp_path)
    store.save((await filled()).export_entries(), 0)
    data = bytearray(store.path.read_bytes())
    header_end = data.index(b"\n")
    position = {"header": header_end // 2, "vectors": header_end + 200, "last byte": -2}[where]
    data[position] ^= 0x01
    store.path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=re.escape(str(store.path))):
        store.load()
    with pytest.raises(SnapshotError, match=r"sha256|unreadable"):
        await Snapshotter(store, ManualClock(), 0).open(new_cache())


async def test_a_truncated_file_is_an_error(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.save((await filled()).export_entries(), 0)
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match=re.escape(str(store.path)) + ".*truncated"):
        store.load()
    store.path.write_bytes(data[:10])
    with pytest.raises(SnapshotError, match=re.escape(str(store.path))):
        store.load()


async def test_an_absent_snapshot_means_an_empty_cache(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "fresh")
    store.prepare()
    assert store.load() is None
    cache = new_cache()
    assert await Snapshotter(store, ManualClock(), 0).open(cache) is None
    assert len(cache) == 0


async def test_writes_are_atomic_and_leave_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(tmp_path)
    cache = await filled()
    store.save(cache.export_entries(), 0)
    store.save(cache.export_entries(), 1)
    assert os.listdir(tmp_path) == [SNAPSHOT_NAME]
    good = store.path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(new_cache().export_entries(), 2)
    assert os.listdir(tmp_path) == [SNAPSHOT_NAME]
    assert store.path.read_bytes() == good


def test_prepare_creates_the_directory_and_removes_stale_temp_files(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "a" / "b")
    store.prepare()
    stale = store.directory / f".{SNAPSHOT_NAME}.x1y2.tmp"
    stale.write_bytes(b"half a snapshot")
    store.prepare()
    assert list(store.directory.iterdir()) == [store.directory / LOCK_NAME]
    store.close()


def test_a_directory_in_use_is_refused_before_anything_in_it_is_touched(tmp_path: Path) -> None:
    first = SnapshotStore(tmp_path)
    first.prepare()
    saving = tmp_path / f".{SNAPSHOT_NAME}.x1y2.tmp"  # the first one's save in progress
    saving.write_bytes(b"half a snapshot")
    second = SnapshotStore(tmp_path)
    with pytest.raises(DirectoryInUse) as refused:
        second.prepare()
    assert refused.value.holder == f"pid {os.getpid()} on {socket.gethostname()}"
    assert saving.read_bytes() == b"half a snapshot"
    first.close()  # the process is done with it
    second.prepare()
    assert not saving.exists()
    assert (tmp_path / LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    second.close()


def test_a_failed_prepare_releases_the_lock_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that fails after taking the lock (the probe file cannot be created: ENOSPC with
    no inodes left, EACCES) lets go of it: before, the descriptor leaked, and a retry in the
    same process was refused as another process -- itself -- holding the directory."""

    def full(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    failing = SnapshotStore(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr("services.semantic_cache.persistence.tempfile.mkstemp", full)
        with pytest.raises(OSError, match="No space left"):
            failing.prepare()
    retry = SnapshotStore(tmp_path)
    retry.prepare()  # the disk has room again
    retry.close()


async def test_restore_needs_an_empty_cache_and_a_sane_export(tmp_path: Path) -> None:
    cache = await filled()
    contents = cache.export_entries()
    with pytest.raises(ValueError, match="empty"):
        cache.restore(contents)
    twice = type(contents)(
        contents.embedder_version,
        contents.dim,
        (*contents.entries, contents.entries[0]),
        np.vstack([contents.vectors, contents.vectors[:1]]),
    )
    empty = new_cache()
    with pytest.raises(ValueError, match="same query twice"):
        empty.restore(twice)
    assert len(empty) == 0


async def test_periodic_saves_skip_an_unchanged_cache_and_stop_saves_last(
    tmp_path: Path,
) -> None:
    store = SnapshotStore(tmp_path)
    cache = new_cache()
    snapshotter = Snapshotter(store, ManualClock(), 0.01)
    await snapshotter.open(cache)
    await cache.store(q("periodic question"), Answer(b"p", "end_turn", 1, False))
    saved = None
    for _ in range(500):  # a save may have run before the store (an empty one): the next
        if store.path.exists() and (saved := store.load()) and saved.contents.entries:
            break
        await asyncio.sleep(0.01)
    assert saved is not None and len(saved.contents.entries) == 1
    assert not await snapshotter.save()  # nothing changed since
    await cache.store(q("last question"), Answer(b"l", "end_turn", 1, False))
    await snapshotter.stop()
    assert (final := store.load()) is not None and len(final.contents.entries) == 2
