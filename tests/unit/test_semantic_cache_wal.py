"""The write-ahead log: framing, torn tails, damage, rotation, and replay into a cache."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.semantic_cache import wal as wal_module
from services.semantic_cache.cache import (
    MAX_STORED_ANSWER_BYTES,
    MAX_STORED_QUESTION_CHARS,
    SemanticCache,
)
from services.semantic_cache.entries import PURGE_GUARD_MS
from services.semantic_cache.index import AnnSettings
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import TailCut, WalError, WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_persistence import new_cache, q
from tests.unit.test_semantic_cache_rules import answer


async def test_records_come_back_in_order_after_a_reopen(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    assert wal.open() == []
    assert [wal.append({"op": "x", "n": i}) for i in range(3)] == [1, 2, 3]
    await wal.sync()
    wal.close()
    again = WriteAheadLog(tmp_path)
    assert [(r["seq"], r["n"]) for r in again.open()] == [(1, 0), (2, 1), (3, 2)]
    assert again.append({"op": "x"}) == 4


async def _two_records(directory: Path) -> Path:
    """A log of two records, synced and closed; its one segment."""
    wal = WriteAheadLog(directory)
    wal.open()
    wal.append({"op": "x", "n": 1})
    wal.append({"op": "x", "n": 2, "pad": "y" * 30})
    await wal.sync()
    wal.close()
    (segment,) = wal.segments()
    return segment


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
async def test_a_torn_tail_is_cut_off_and_the_rest_kept(tmp_path: Path, cut: int) -> None:
    segment = await _two_records(tmp_path)
    segment.write_bytes(segment.read_bytes()[:-cut])  # a crash in the middle of the append
    again = WriteAheadLog(tmp_path)
    assert [r["n"] for r in again.open()] == [1]
    assert again.append({"op": "x", "n": 3}) == 2  # the torn record's number is reused


async def test_a_torn_tail_is_cut_with_a_warning_naming_the_file_offset_and_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = await _two_records(tmp_path)
    whole = segment.read_bytes()
    first_end = 8 + int.from_bytes(whole[:4], "big")
    segment.write_bytes(whole[:-5])  # the second record cut short: a crash mid-append
    again = WriteAheadLog(tmp_path)
    with caplog.at_level(logging.INFO, logger="cachemesh.semantic_cache.persistence"):
        assert [r["n"] for r in again.records()] == [1]
    torn = len(whole) - 5 - first_end
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert str(segment) in message and f"byte {first_end}" in message
    assert f"{torn} bytes" in message
    assert segment.stat().st_size == first_end
    assert again.tail_cut == TailCut("torn", segment, first_end, torn, None)
    assert os.listdir(tmp_path) == [segment.name]  # nothing moved aside


@pytest.mark.parametrize("flip", ["body", "crc"])
async def test_a_damaged_last_record_is_moved_aside_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, flip: str
) -> None:
    """A whole record whose checksum fails is not what a crash mid-append leaves: it may be an
    acknowledged Store. It is not replayed, but kept beside the log, with an error saying so
    (before: cut off without a word, the entry silently gone after the restart)."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    for i in range(3):
        wal.append({"op": "store", "tenant": "t", "n": i})
    await wal.sync()
    wal.close()
    (segment,) = wal.segments()
    data = bytearray(segment.read_bytes())
    offset = 0
    for _ in range(2):
        offset += 8 + int.from_bytes(data[offset : offset + 4], "big")
    third = bytes(data[offset:])
    data[offset + (4 if flip == "crc" else 8 + (len(third) - 8) // 2)] ^= 0x04
    segment.write_bytes(bytes(data))
    again = WriteAheadLog(tmp_path)
    with caplog.at_level(logging.INFO, logger="cachemesh.semantic_cache.persistence"):
        assert [r["n"] for r in again.open()] == [0, 1]
    damaged = segment.with_name(segment.name + ".damaged")
    assert segment.stat().st_size == offset
    assert damaged.read_bytes() == bytes(data[offset:])  # kept for the operator
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelno == logging.ERROR
    message = error.getMessage()
    assert str(segment) in message and f"byte {offset}" in message and str(damaged) in message
    assert f"{len(third)} bytes" in message and "record 3" in message
    assert "acknowledged" in message
    assert again.tail_cut == TailCut("damaged", segment, offset, len(third), damaged)
    assert again.append({"op": "x"}) == 3
    assert [p.name for p in again.segments()] == [segment.name, f"{3:020d}.log"]


def _zero_tails(record: bytes) -> dict[str, bytes]:
    """What a crash after the size grew but before the data landed leaves after the whole
    records (ext4 and XFS may zero-fill it), for the record ``record`` that was being appended."""
    header, body = record[:8], record[8:]
    return {
        "zeros only": b"\0" * 4096,
        "a header, its body zeros": header + b"\0" * len(body),
        "half a body, then zeros": header + body[: len(body) // 2] + b"\0" * (len(body) // 2 + 1),
        "a header, zeros past the body": header + b"\0" * (len(body) + 4000),
    }


@pytest.mark.parametrize("tail", list(_zero_tails(b"\0" * 40)))
async def test_a_zero_filled_tail_is_torn_never_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: str
) -> None:
    """A power loss may leave the end of the last segment zero-filled: a crash before the
    append's fsync returned, never acknowledged. It is cut off with the torn warning (before:
    a zero header reads as length 0 and CRC 0, which crc32(b"") passes, so it was "damaged",
    moved aside with an error saying an acknowledged Store may be lost, counted kind=damaged)."""
    segment = await _two_records(tmp_path)
    whole = segment.read_bytes()
    first_end = 8 + int.from_bytes(whole[:4], "big")
    bad = _zero_tails(whole[first_end:])[tail]
    segment.write_bytes(whole[:first_end] + bad)
    again = WriteAheadLog(tmp_path)
    with caplog.at_level(logging.INFO, logger="cachemesh.semantic_cache.persistence"):
        assert [r["n"] for r in again.open()] == [1]
    assert again.tail_cut == TailCut("torn", segment, first_end, len(bad), None)
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert not [name for name in os.listdir(tmp_path) if ".damaged" in name]
    assert again.append({"op": "x", "n": 3}) == 2


@pytest.mark.parametrize(
    "bad",
    [b"\0\0\0\0\x12\x34\x56\x78", b"\0\0\0\0\x12\x34\x56\x78" + b"\0" * 100],
    ids=["length 0", "length 0, zeros after"],
)
async def test_a_record_of_length_0_with_a_checksum_is_damage(tmp_path: Path, bad: bytes) -> None:
    """No record is ever written empty (a body holds its seq at least): a header of length 0
    with a checksum is not a zero-filled crash tail but damage, and kept for the operator."""
    segment = await _two_records(tmp_path)
    whole = segment.read_bytes()
    first_end = 8 + int.from_bytes(whole[:4], "big")
    segment.write_bytes(whole[:first_end] + bad)
    again = WriteAheadLog(tmp_path)
    assert [r["n"] for r in again.open()] == [1]
    assert again.tail_cut is not None and again.tail_cut.kind == "damaged"


async def test_a_tail_cut_is_counted_and_named_in_the_replay_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    for question in ("how do i reset my password", "what is the refund policy"):
        await cache.store(q(question), answer(b"x"))
    (segment,) = (tmp_path / "wal").glob("*.log")
    data = bytearray(segment.read_bytes())
    data[-10] ^= 0x04  # inside the last record's body
    segment.write_bytes(bytes(data))
    cuts: list[str] = []
    revived = new_cache(clock)
    snapshotter = Snapshotter(
        SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"), on_tail_cut=cuts.append
    )
    with caplog.at_level(logging.INFO, logger="cachemesh.semantic_cache.persistence"):
        await snapshotter.open(revived)
    assert cuts == ["damaged"]
    assert len(revived) == 1
    (line,) = [r.getMessage() for r in caplog.records if "records after" in r.getMessage()]
    assert "replayed 1 write-ahead-log records" in line and ".damaged" in line


async def test_damage_before_the_tail_is_an_error_naming_the_file(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.open()
    for i in range(3):
        wal.append({"op": "x", "n": i})
    await wal.sync()
    wal.close()
    (segment,) = wal.segments()
    data = bytearray(segment.read_bytes())
    data[12] ^= 0x01  # inside the first record's body
    segment.write_bytes(bytes(data))
    with pytest.raises(WalError, match=str(segment)):
        WriteAheadLog(tmp_path).open()


async def test_only_the_records_after_the_snapshot_are_read(tmp_path: Path) -> None:
    """A segment a snapshot covers whole is not read at all (it would only be decoded and
    thrown away); the records after the snapshot come back, numbered on."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append({"op": "x", "n": 1})
    wal.append({"op": "x", "n": 2})
    _, covered = await wal.rotate(lambda: None)  # a snapshot holds records 1 and 2
    wal.append({"op": "x", "n": 3})
    wal.append({"op": "x", "n": 4})
    await wal.sync()
    wal.close()
    first = wal.segments()[0]
    first.write_bytes(b"not a record at all " * 10)  # were it read, it would be damage
    again = WriteAheadLog(tmp_path)
    assert [(r["seq"], r["n"]) for r in again.open(covered)] == [(3, 3), (4, 4)]
    assert again.append({"op": "x"}) == 5


async def test_reading_the_log_holds_one_record_at_a_time(tmp_path: Path) -> None:
    """Recovery streams the log: 10 MB of records are read without holding them, or the
    segment they are in, in memory at once."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    for i in range(200):
        wal.append({"op": "x", "n": i, "pad": "y" * 50_000})
    await wal.sync()
    wal.close()
    again = WriteAheadLog(tmp_path)
    tracemalloc.start()
    try:
        seen = [r["n"] for r in again.records()]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == list(range(200))
    assert peak < 1_000_000  # a few records of 50 kB, not the 10 MB log
    again.start()
    assert again.append({"op": "x"}) == 201


@pytest.mark.parametrize("big_first", [True, False])
async def test_a_record_over_the_append_limit_already_on_disk_is_read_never_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big_first: bool
) -> None:
    """A log written before appends were bounded may hold an acknowledged record over the
    limit: whole and intact, it is replayed, neither damage (a service that will not start)
    nor a torn tail (cut off, with every record after it)."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    big, small = {"op": "x", "pad": "y" * 5000}, {"op": "x", "n": 1}
    for body in (big, small) if big_first else (small, big):
        wal.append(body)
    await wal.sync()
    wal.close()
    monkeypatch.setattr(wal_module, "_MAX_RECORD", 1024)
    again = WriteAheadLog(tmp_path)
    assert [len(r.get("pad", "")) for r in again.open()] == ([5000, 0] if big_first else [0, 5000])
    assert again.append({"op": "x"}) == 3


async def test_an_append_over_the_record_limit_is_refused_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wal_module, "_MAX_RECORD", 1024)
    wal = WriteAheadLog(tmp_path)
    wal.open()
    with pytest.raises(WalError, match="over the write-ahead log's limit of 1,024 bytes"):
        wal.append({"op": "x", "pad": "y" * 2000})
    assert wal.append({"op": "x", "n": 1}) == 1
    await wal.sync()
    wal.close()
    assert [r["n"] for r in WriteAheadLog(tmp_path).open()] == [1]


async def test_the_largest_storable_answer_and_question_fit_in_one_record(
    tmp_path: Path,
) -> None:
    """The Store bounds (answer bytes, question characters) keep every store record under the
    log's limit, with room to spare: JSON escapes and base64 included."""
    store = SnapshotStore(tmp_path)
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(cache)
    question = "\U0001f600" * MAX_STORED_QUESTION_CHARS  # 12 bytes each once JSON-escaped
    payload = bytes(range(256)) * (MAX_STORED_ANSWER_BYTES // 256)
    assert (await cache.store(q(question), answer(payload))).stored
    (segment,) = (tmp_path / "wal").glob("*.log")
    assert segment.stat().st_size < wal_module._MAX_RECORD // 2
    revived = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    hit = await revived.check(q(question))
    assert hit.entry is not None and hit.entry.answer.payload == payload


async def test_rotation_hands_over_exactly_the_copied_records(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append({"op": "x"})
    wal.append({"op": "x"})
    copied, last = await wal.rotate(lambda: "copy")
    assert (copied, last) == ("copy", 2)
    wal.append({"op": "x"})
    await wal.sync()
    assert len(wal.segments()) == 2
    assert wal.drop_through(last) == 1
    wal.close()
    assert [r["seq"] for r in WriteAheadLog(tmp_path).open(last)] == [3]


async def test_rotation_makes_the_old_segment_whole_before_the_new_one_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss between the two would otherwise leave a torn record in a segment that is
    no longer the last: damage, and a service that will not start."""
    events: list[str] = []
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append({"op": "x"})
    real_fsync, real_start = os.fsync, wal._start_segment

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def start() -> None:
        events.append("new segment")
        real_start()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(wal, "_start_segment", start)
    await wal.rotate(lambda: "copy")
    first = WriteAheadLog(tmp_path).segments()[0].name
    assert events.index("new segment") > max(
        i for i, e in enumerate(events) if e == f"fsync {first}"
    )
    assert events[-1] != f"fsync {first}"
    wal.close()


async def test_acknowledged_changes_survive_without_any_snapshot(tmp_path: Path) -> None:
    """A crash before the first snapshot: the log alone brings back stores and drops."""
    store = SnapshotStore(tmp_path)
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(cache)
    kept = await cache.store(q("how do i reset my password"), answer(b"reset"))
    gone = await cache.store(q("how do i delete my account"), answer(b"delete"))
    await cache.store(q("what is the refund policy", "b"), answer(b"refund"))
    assert await cache.drop_entry("a", gone.entry_id) == 1
    assert await cache.drop("b") == 1
    # no stop(), no snapshot: the process is gone
    revived = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    assert len(revived) == 1
    hit = await revived.check(q("how do i reset my password"))
    assert hit.entry is not None and hit.entry.entry_id == kept.entry_id
    assert hit.entry.answer.payload == b"reset"
    assert [e.entry_id for e in revived.export_entries().entries] == [kept.entry_id]


async def test_a_snapshot_plus_the_records_after_it(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    clock = ManualClock()
    cache = new_cache(clock)
    snapshotter = Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshotter.open(cache)
    await cache.store(q("how do i reset my password"), answer(b"one"))
    assert await snapshotter.save()
    await cache.store(q("how do i delete my account"), answer(b"two"))
    await cache.store(q("how do i reset my password"), answer(b"one, revised"))
    revived = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    assert len(revived) == 2
    hit = await revived.check(q("how do i reset my password"))
    assert hit.entry is not None and hit.entry.answer.payload == b"one, revised"
    exported = revived.export_entries()
    assert exported.vectors.shape == (2, revived.dim)
    assert np.allclose(np.linalg.norm(exported.vectors, axis=1), 1.0, atol=1e-5)


async def test_a_store_is_acknowledged_only_after_its_record_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the fsync a store would be acknowledged from the page cache and lost with the
    machine; the log's own fsync is checked to cover the store's record before it returns."""
    import os

    store = SnapshotStore(tmp_path)
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(cache)
    real_fsync = os.fsync
    synced: list[int] = []  # the log's size on disk at each fsync of it

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    wal_dir = tmp_path / "wal"
    for question in ("how do i reset my password", "what is the refund policy"):
        before = len(synced)
        await cache.store(q(question), answer(b"x"))
        segment = max(wal_dir.glob("*.log"), key=lambda p: int(p.stem))
        assert len(synced) > before, "the store was acknowledged without an fsync"
        assert synced[-1] == segment.stat().st_size > 0, "the fsync did not cover its record"


async def _crash_and_replay(
    tmp_path: Path, clock: ManualClock, max_entries: int = 100
) -> SemanticCache:
    revived = new_cache(clock, max_entries=max_entries)
    store = SnapshotStore(tmp_path)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    return revived


async def test_a_replayed_store_that_expired_still_leaves_the_answer_it_replaced_out(
    tmp_path: Path,
) -> None:
    """E1 (1 day), then a refresh of the same question with a 60 s TTL (E2); the process dies
    and comes back after E2 expired: E1 must not be served again."""
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    question = "what is the refund window"
    await cache.store(q(question), answer(b"OLD: 90 days"), default_ttl_s=86_400)
    clock.advance(s=10)
    refresh = q(question, mode=pb.SEMANTIC_MODE_REFRESH)
    await cache.store(refresh, answer(b"NEW: 30 days"), default_ttl_s=60)
    clock.advance(s=120)
    assert not (await cache.check(q(question))).hit  # live: the new one expired, nothing
    revived = await _crash_and_replay(tmp_path, clock)
    assert not (await revived.check(q(question))).hit


async def test_a_purge_that_found_nothing_is_logged_for_the_replay(tmp_path: Path) -> None:
    """Evictions are not logged, so a replay may hold an entry this process had evicted; the
    tenant's later purge must remove it there too."""
    clock = ManualClock()
    cache = new_cache(clock, max_entries=2)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    await cache.store(q("how do i reset my password"), answer(b"A"))
    await cache.store(q("what is the secret discount code", "b"), answer(b"B-secret"))
    assert (await cache.check(q("how do i reset my password"))).hit  # B is now the oldest
    await cache.store(q("how do i delete my account", "c"), answer(b"C"))  # evicts B
    assert await cache.drop("b") == 0
    revived = await _crash_and_replay(tmp_path, clock, max_entries=2)
    assert not (await revived.check(q("what is the secret discount code", "b"))).hit


async def test_a_replay_evicts_from_the_tenant_holding_the_most_as_the_process_did(
    tmp_path: Path,
) -> None:
    """b stores 2 answers, then a floods the cache: the process kept b's 2 and a's 2 most
    recent, and so does the replay of its log."""
    clock = ManualClock()
    cache = new_cache(clock, max_entries=4)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    for question in ("how do i reset my password", "what is the refund policy"):
        await cache.store(q(question, "b"), answer(b"B"))
    for i in range(6):
        await cache.store(q(f"tell me fact {i} about planet x{i}"), answer(b"A"))
    live = [(e.tenant, e.query) for e in cache.export_entries().entries]
    assert cache.stats.entries == {"a": 2, "b": 2}
    revived = await _crash_and_replay(tmp_path, clock, max_entries=4)
    assert [(e.tenant, e.query) for e in revived.export_entries().entries] == live
    assert revived.stats.entries == {"a": 2, "b": 2}


@pytest.mark.parametrize("restart", ["graceful", "crash"])
async def test_a_purge_still_refuses_a_late_store_after_a_restart(
    tmp_path: Path, restart: str
) -> None:
    """A lookup misses, the tenant purges (the refund policy changed), semantic-cache restarts
    (a deploy: the last snapshot covers the purge and the log before it is deleted; or a crash:
    the log is replayed), then the model call's Store arrives: the answer predates the purge
    and must not come back. Past the guard's window a Store is taken again (a purge replayed
    from the log counts from the replay: never shorter)."""
    clock = ManualClock()
    cache = new_cache(clock)
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshots.open(cache)
    await cache.store(q("what is the refund window"), answer(b"14 days"))
    asked = dataclasses.replace(q("how long do refunds take"), request_id="req-1")
    assert not (await cache.check(asked)).hit  # the model call starts
    clock.advance(s=5)
    assert await cache.drop("a") == 1
    if restart == "graceful":
        await snapshots.stop()
    clock.advance(s=30)
    revived = await _crash_and_replay(tmp_path, clock)
    stored = await revived.store(asked, answer(b"14 days"))
    assert not stored.stored and "after this request's lookup" in stored.skip_reason
    assert not (await revived.check(q("how long do refunds take"))).hit
    clock.advance(ms=PURGE_GUARD_MS + 1)
    later = dataclasses.replace(q("how long do refunds take"), request_id="req-2")
    assert (await revived.store(later, answer(b"30 days"))).stored


def _fail_one_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next fsync fails with EIO (a disk error); the ones after it succeed."""
    real_fsync = os.fsync
    failures = iter([OSError(5, "Input/output error")])

    def fsync(fd: int) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


async def test_after_a_failed_fsync_nothing_is_acknowledged_as_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync may have lost its pages while a later one succeeds: from the first
    failure on, every append and sync fails, naming the cause, until a snapshot taken since
    is saved."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    _fail_one_fsync(monkeypatch)
    wal.append({"op": "x"})
    with pytest.raises(WalError, match="fsync of the write-ahead log failed"):
        await wal.sync()
    with pytest.raises(WalError, match="Input/output error"):
        wal.append({"op": "x"})  # the disk answers again: still refused, said so
    copied, last = await wal.rotate(lambda: "copy")  # a snapshot's copy is from memory
    assert copied == "copy" and last == 1
    wal.superseded(last)  # that snapshot saved: it holds every change applied
    assert wal.append({"op": "x"}) == 2
    await wal.sync()
    wal.close()


async def _three_saved(
    data: Path, payload: bytes
) -> tuple[SnapshotStore, ManualClock, SemanticCache]:
    """A cache started on ``data`` (its log in ``data/wal``) with three Stores of ``payload``
    (records 1 to 3), then saved: the snapshot holds them, their segment deleted."""
    store = SnapshotStore(data)
    clock = ManualClock()
    cache = new_cache(clock)
    snapshotter = Snapshotter(store, clock, 0, WriteAheadLog(data / "wal"))
    await snapshotter.open(cache)
    for i in range(3):
        await cache.store(q(f"question number {i}"), answer(payload))
    assert await snapshotter.save()
    return store, clock, cache


async def test_a_lost_log_is_numbered_on_after_the_snapshot(tmp_path: Path) -> None:
    """The log directory lost (a volume not mounted, say) while the snapshot holds records up
    to n: new records must be numbered after n, or the next replay skips them."""
    import shutil

    store, clock, _ = await _three_saved(tmp_path, b"old")
    shutil.rmtree(tmp_path / "wal")
    after = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(after)
    await after.store(q("a question after the loss"), answer(b"new"))
    revived = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    hit = await revived.check(q("a question after the loss"))
    assert hit.entry is not None and hit.entry.answer.payload == b"new"


async def test_a_snapshot_older_than_the_log_stops_the_start_naming_the_gap(
    tmp_path: Path,
) -> None:
    """A backup taken file by file: the snapshot copied, then a save deleted the segments it
    covered, then wal/ copied. Restored, the old snapshot and the newer log miss the records
    between them: replayed over it, the purge of tenant b and the corrected answer in that gap
    came undone (both old answers served, no word in the log); now the start stops, naming
    the segment and the records missing."""
    import shutil

    data = tmp_path / "data"
    store = SnapshotStore(data)
    clock = ManualClock()
    cache = new_cache(clock)
    snapshotter = Snapshotter(store, clock, 0, WriteAheadLog(data / "wal"))
    await snapshotter.open(cache)
    await cache.store(q("how do i reset my password"), answer(b"old, wrong"))
    await cache.store(q("what is the refund policy", "b"), answer(b"tenant b's"))
    assert await snapshotter.save()  # holds records 1 and 2
    backup = tmp_path / "backup.snapshot"
    shutil.copy(store.path, backup)
    await cache.store(q("how do i reset my password"), answer(b"corrected"))  # record 3
    assert await cache.drop("b") == 1  # record 4
    assert await snapshotter.save()  # deletes the segment of records 1-4
    await cache.store(q("a question after them"), answer(b"after"))  # record 5
    shutil.copy(backup, store.path)
    revived = new_cache(clock)
    with pytest.raises(WalError, match=r"begins at record 5.* up to 2 only: records 3 to 4") as e:
        await Snapshotter(store, clock, 0, WriteAheadLog(data / "wal")).open(revived)
    assert str(WriteAheadLog(data / "wal").segments()[0]) in str(e.value)
    assert f"move both the snapshot and {data / 'wal'} aside" in str(e.value)


async def test_a_log_without_its_snapshot_is_replayed_and_the_loss_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The snapshot removed (moved aside once reported damaged): nothing older is held, so
    the log's records are replayed; the records only the snapshot held are said lost in an
    error line (before: "no snapshot ...: starting empty" and the replay's line, at INFO)."""
    store, clock, cache = await _three_saved(tmp_path, b"in the snapshot")
    await cache.store(q("a question after them"), answer(b"after"))
    store.path.unlink()
    revived = new_cache(clock)
    with caplog.at_level(logging.ERROR, logger="cachemesh.semantic_cache.persistence"):
        await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    assert [e.answer.payload for e in revived.export_entries().entries] == [b"after"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "begins at record 4 and there is no snapshot: records 1 to 3 were" in line
    assert "and lost" in line


async def test_numbers_a_failure_lost_at_a_segment_start_are_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records lost by a failed fsync at the start of a segment, the snapshot that would
    cover them never saved, then a restart: the log numbers on from the last (empty) segment,
    and those numbers are in no file. They were never acknowledged: the log is read, not
    refused as one begun after its snapshot."""
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.append({"op": "x", "n": 1})
    wal.append({"op": "x", "n": 2})
    _, covered = await wal.rotate(lambda: None)  # a snapshot holds records 1 and 2
    _fail_one_fsync(monkeypatch)
    wal.append({"op": "x", "n": 3})
    with pytest.raises(WalError):
        await wal.sync()  # record 3 lost: its segment is left empty
    await wal.rotate(lambda: None)  # the snapshot after the failure: its save fails
    wal.close()
    again = WriteAheadLog(tmp_path)
    assert again.open(covered) == []
    assert again.append({"op": "x", "n": 4}) == 4
    await again.sync()
    again.close()
    assert [(r["seq"], r["n"]) for r in WriteAheadLog(tmp_path).open(covered)] == [(4, 4)]


async def test_a_snapshot_after_a_failed_fsync_saves_and_stores_are_durable_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(tmp_path)
    clock = ManualClock()
    cache = new_cache(clock)
    snapshotter = Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshotter.open(cache)
    _fail_one_fsync(monkeypatch)
    with pytest.raises(WalError):
        await cache.store(q("how do i reset my password"), answer(b"one"))
    assert not (await cache.check(q("how do i reset my password"))).hit  # refused: not served
    assert await snapshotter.save()  # nothing changed, but the log waits for it
    assert (await cache.store(q("how do i delete my account"), answer(b"two"))).stored
    revived = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(revived)
    assert [e.answer.payload for e in revived.export_entries().entries] == [b"two"]


@pytest.mark.parametrize("limit", [2, 3])
async def test_a_long_replay_is_saved_as_a_snapshot_at_once(tmp_path: Path, limit: int) -> None:
    """Replaying more records than the limit saves a snapshot before serving, so the next
    crash does not replay them all again (with SEMANTIC_CACHE_SNAPSHOT_S=0 nothing else
    would until a clean stop); a shorter replay saves nothing."""
    store = SnapshotStore(tmp_path)
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(cache)
    for i in range(3):
        await cache.store(q(f"question number {i}"), answer(b"x"))
    # no stop(), no snapshot: the process is gone
    revived = new_cache(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    await Snapshotter(store, clock, 0, wal, snapshot_after_replay=limit).open(revived)
    saved = store.load()
    if limit == 3:
        assert saved is None
        assert [int(p.stem) for p in wal.segments()] == [1, 4]
        return
    assert saved is not None and saved.wal_seq == 3
    assert sorted(e.query for e in saved.contents.entries) == [
        f"question number {i}" for i in range(3)
    ]
    assert [int(p.stem) for p in wal.segments()] == [4]  # the replayed records are gone
    assert (await revived.store(q("one more question"), answer(b"y"))).stored
    again = new_cache(clock)
    await Snapshotter(store, clock, 0, WriteAheadLog(tmp_path / "wal")).open(again)
    assert len(again) == 4


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


async def test_a_stop_during_the_replay_waits_for_it_and_leaves_the_directory_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM during the warm-up cancels it, but a worker thread cannot be cancelled:
    before, stop() returned at once (no cache yet) and the process released the directory's
    lock while the replay went on to open a segment, save a snapshot and delete segments.
    Now the replay stops at its next record, and stop() returns once its thread has ended."""
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    for i in range(3):
        await cache.store(q(f"question number {i}"), answer(b"x"))
    # no stop(), no snapshot: the process is gone
    before = _files(tmp_path)
    replaying, release = threading.Event(), threading.Event()
    real_apply_store = SemanticCache.apply_store

    def held_apply_store(self: SemanticCache, *args: object) -> bool:
        replaying.set()
        release.wait(timeout=60)
        return real_apply_store(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SemanticCache, "apply_store", held_apply_store)
    wal = WriteAheadLog(tmp_path / "wal")
    snapshotter = Snapshotter(SnapshotStore(tmp_path), clock, 0, wal, snapshot_after_replay=1)
    opening = asyncio.create_task(snapshotter.open(new_cache(clock)))
    try:
        assert await asyncio.to_thread(replaying.wait, 60), "the replay never started"
        opening.cancel()  # the warm-up, cancelled by the stop
        stopping = asyncio.create_task(snapshotter.stop())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not stopping.done()  # the replay's thread runs: the lock must outlive it
    finally:
        release.set()
    await stopping
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert _files(tmp_path) == before  # nothing applied to the log, nothing saved or deleted


async def test_the_replay_runs_with_the_configured_faiss_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenMP threads are a per-thread setting: the replay's worker thread would otherwise add
    to an IVF on every core (each add spinning them all up: 47 s of CPU for 100k records from
    the log, against 6 s on the configured one)."""
    fresh: list[int] = []  # what a new thread has unless it sets its own
    probe = threading.Thread(target=lambda: fresh.append(faiss.omp_get_max_threads()))
    probe.start()
    probe.join()
    configured = fresh[0] + 1  # differs from it, whatever the machine
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    await cache.store(q("how do i reset my password"), answer(b"x"))
    seen: list[int] = []
    real_apply_store = SemanticCache.apply_store

    def apply_store(self: SemanticCache, *args: object) -> bool:
        seen.append(faiss.omp_get_max_threads())
        return real_apply_store(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SemanticCache, "apply_store", apply_store)
    revived = SemanticCache(
        FakeEmbedder(), clock, threshold=0.5, ann=AnnSettings(threads=configured)
    )
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        revived
    )
    assert seen == [configured]
