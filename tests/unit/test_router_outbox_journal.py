"""The billing outbox's journal on its own: loaded whole whatever size each read returns, and
held by one router at a time."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import threading
from functools import partial
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as gw
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.env import ConfigError
from services.router.outbox_journal import JOURNAL_NAME, JOURNAL_VERSION, Journal, JournalError
from services.router.outbox_journal_thread import JournalThread
from tests.fsyncs import record_fsyncs


def _commit(key: str) -> list[pc.CommitRequest]:
    return [pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_FINAL)]


def test_short_reads_lose_no_acknowledged_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read returns fewer bytes than asked (Linux: at most 2 GiB a read; here 37 bytes, which
    end mid-line): the journal is read to its end, every entry is loaded and readable, and only
    the torn line after the file's last newline is cut."""
    journal = Journal(tmp_path)
    journal.load()
    keys = [f"r{i}#1" for i in range(40)]
    for i, key in enumerate(keys):
        journal.add(f"e{i}", _commit(key))
    journal.done("e3")
    journal.sync()
    journal.close()
    path = tmp_path / JOURNAL_NAME
    whole = path.stat().st_size
    with path.open("a") as handle:
        handle.write('{"add": "x", "commits": ["AAA')  # a crash came mid-append
    real_pread = os.pread

    def short_pread(fd: int, length: int, offset: int) -> bytes:
        return real_pread(fd, min(length, 37), offset)

    monkeypatch.setattr(os, "pread", short_pread)
    again = Journal(tmp_path)
    pending = again.load()
    assert pending == [f"e{i}" for i in range(40) if i != 3]
    assert [again.read(entry)[0].request_id for entry in pending] == keys[:3] + keys[4:]
    assert path.stat().st_size == whole  # the torn line cut, nothing before it
    again.close()


def test_a_second_journal_on_the_directory_is_refused_until_the_first_is_closed(
    tmp_path: Path,
) -> None:
    """Two routers on one ROUTER_DATA_DIR would each append at their own idea of the file's
    end, overwriting each other's acknowledged entries: the second is refused at start-up,
    naming the variable; once the first is closed (its process ended) the directory is free."""
    first = Journal(tmp_path)
    first.load()
    first.add("a", _commit("a#1"))
    first.sync()
    with pytest.raises(ConfigError, match="ROUTER_DATA_DIR: another router is using"):
        Journal(tmp_path)
    first.add("b", _commit("b#1"))  # the first goes on, its entries whole
    first.sync()
    first.close()
    again = Journal(tmp_path)
    assert [again.read(entry)[0].request_id for entry in again.load()] == ["a#1", "b#1"]
    again.close()


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file opened for writing fails as on a read-only mount (the tests run as root,
    whom a directory's mode does not stop)."""
    real = os.open

    def refuse(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)


@pytest.mark.parametrize("where", ["a file", "beneath a file", "read-only"])
def test_a_data_directory_that_cannot_be_made_or_written_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ROUTER_DATA_DIR naming a file, or a place the router cannot write, stopped the router
    with an OSError traceback that never named the variable."""
    (tmp_path / "afile").write_text("")
    directory = {
        "a file": tmp_path / "afile",
        "beneath a file": tmp_path / "afile" / "router",
        "read-only": tmp_path / "router",
    }[where]
    if where == "read-only":
        _read_only(monkeypatch)
    with pytest.raises(ConfigError, match=r"^ROUTER_DATA_DIR=.*: cannot create or write") as err:
        Journal(directory)
    assert str(directory) in str(err.value)


def _final(key: str, output_tokens: int) -> list[pc.CommitRequest]:
    final = pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_FINAL)
    final.output_tokens = output_tokens
    return [final]


def test_an_open_call_is_rewritten_by_its_later_lines_and_loads_as_open(tmp_path: Path) -> None:
    """An open call (a model call still running) is an "add" line marked open, of version 2;
    its later lines (its output grew) replace it; a router starting after a kill finds it
    pending and open. A version-1 reader (an older router) reads the same line as an entry."""
    journal = Journal(tmp_path)
    journal.load()
    journal.add("o", _final("o#1", 0), open_call=True)
    journal.add("a", _commit("a#1"))
    journal.add("o", _final("o#1", 7), open_call=True)
    journal.sync()
    journal.close()
    lines = [json.loads(line) for line in (tmp_path / JOURNAL_NAME).read_text().splitlines()]
    assert [(line["add"], line["v"], line.get("open")) for line in lines] == [
        ("o", 2, True),
        ("a", 2, None),
        ("o", 2, True),
    ]
    assert all(isinstance(line["commits"], list) for line in lines)  # as version 1 has them
    again = Journal(tmp_path)
    assert again.load() == ["o", "a"] and again.opened() == ["o"]
    assert again.read("o")[0].output_tokens == 7  # its last line
    assert again.is_open("o") and not again.is_open("a") and not again.is_open("gone")
    again.close()


def test_an_open_call_keeps_when_its_call_started_and_an_older_line_reads_without(
    tmp_path: Path,
) -> None:
    """An open call's line says when its model call started (``started_ms``, the wall
    clock's), rewritten with it and kept by a compaction: its cost counts in that day's
    budget. A line of a router from before it was kept (no ``started_ms``) reads as None."""
    old = {"add": "old", "commits": [], "v": 2, "open": True}
    (tmp_path / JOURNAL_NAME).write_text(json.dumps(old) + "\n")
    journal = Journal(tmp_path, compact_bytes=1)
    journal.load()
    journal.add("o", _final("o#1", 0), open_call=True, started_ms=1_700_000_000_000)
    journal.add("o", _final("o#1", 7), open_call=True, started_ms=1_700_000_000_000)
    journal.sync()  # compacted: only the pending lines
    journal.close()
    again = Journal(tmp_path)
    assert again.load() == ["old", "o"] and again.opened() == ["old", "o"]
    assert again.read_traced("o").started_ms == 1_700_000_000_000
    assert again.read_traced("old").started_ms is None
    again.close()


def test_an_open_call_replaced_by_its_outbox_entry_or_done_is_no_longer_open(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.load()
    journal.add("o", _final("o#1", 0), open_call=True)
    journal.add("p", _final("p#1", 0), open_call=True)
    journal.add("o", _commit("o#1"))  # its answer's commits, kept for prefix-cache
    journal.done("p")  # its FINAL was made
    journal.sync()
    journal.close()
    again = Journal(tmp_path)
    assert again.load() == ["o"] and again.opened() == []
    again.close()


def test_a_rewritten_open_call_counts_its_old_lines_as_settled(tmp_path: Path) -> None:
    """Each rewrite of an open call leaves its old line settled: the journal is rewritten
    with the last line only once those outweigh it, and the call is still open after."""
    journal = Journal(tmp_path, compact_bytes=1)
    journal.load()
    for output_tokens in range(10):
        journal.add("o", _final("o#1", output_tokens), open_call=True)
    journal.sync()
    journal.close()
    assert len((tmp_path / JOURNAL_NAME).read_text().splitlines()) == 1
    again = Journal(tmp_path)
    assert again.load() == ["o"] and again.opened() == ["o"]
    assert again.read("o")[0].output_tokens == 9
    again.close()


MARK = "ZQX-erasure-marker"


def _texts(path: Path) -> int:
    """The lines of the journal at ``path`` whose commits carry the marked prompt."""
    found = 0
    for line in path.read_bytes().splitlines():
        commits = json.loads(line).get("commits", [])
        found += any(MARK.encode() in base64.b64decode(c) for c in commits)
    return found


def _outage_entry(key: str) -> list[pc.CommitRequest]:
    """An answer's bill kept while prefix-cache was down: its WARM carries the request."""
    request = gw.CompleteRequest(
        model="sim-small",
        messages=[gw.Message(role=gw.ROLE_USER, content=[gw.ContentBlock(text=MARK * 500)])],
    )
    warm = pc.CommitRequest(
        tenant="t", request_id=key, phase=pc.COMMIT_PHASE_WARM, model="sim-small", request=request
    )
    return [warm, *_commit(key)]


def test_a_billed_requests_text_leaves_the_journal_while_another_entry_is_pending(
    tmp_path: Path,
) -> None:
    """An outage's bill carries its request (the prompt) in the journal; once billed, its
    text is rewritten away at the next sync that finds the settled lines outweighing the
    pending ones, though an entry stays pending (a call in flight). Before, it stayed until
    64 MiB of later lines came (716,046 settled open calls). Lines without text keep the
    COMPACT_BYTES rule, so a rewrite costs at most what was written since the last."""
    journal = Journal(tmp_path)  # the default COMPACT_BYTES (64 MiB)
    journal.load()
    path = tmp_path / JOURNAL_NAME
    journal.add("open", _commit("open#1"), open_call=True)  # a model call in flight
    journal.add("outage", _outage_entry("r1#1"))
    journal.sync()
    assert _texts(path) == 1  # pending: kept, as it must be to bill it
    journal.done("outage")
    journal.sync()
    assert _texts(path) == 0
    assert journal.pending() == ["open"] and journal.opened() == ["open"]
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["add"] == "open"
    # settled lines without text are left for COMPACT_BYTES: no rewrite for each call
    for i in range(20):
        journal.add(f"c{i}", _commit(f"c{i}#1"), open_call=True)
        journal.done(f"c{i}")
        journal.sync(fsync=False)
    assert len(path.read_text().splitlines()) == 41
    journal.close()


def test_a_start_rewrites_away_the_settled_lines_it_finds(tmp_path: Path) -> None:
    """A router stopped with an outage's billed line still in the file (an entry pending
    then): the next start cannot tell which settled lines carried text without reading them
    all, so its first sync rewrites them away once they outweigh the pending ones."""
    journal = Journal(tmp_path)
    journal.load()
    journal.add("open", _commit("open#1"), open_call=True)
    journal.add("outage", _outage_entry("r1#1"))
    journal.sync()
    journal.close()  # killed after the bill was sent, before its "done": then done
    path = tmp_path / JOURNAL_NAME
    with path.open("a") as handle:
        handle.write(json.dumps({"done": "outage"}) + "\n")
    again = Journal(tmp_path)
    assert again.load() == ["open"]
    assert _texts(path) == 1
    again.sync()
    assert _texts(path) == 0 and again.pending() == ["open"]
    again.close()


def _newer_lines() -> list[str]:
    """Lines a router of a later journal version might write: one whose commits this build
    could not read, one it could read but whose meaning it cannot know, one that is no entry."""
    commits = [base64.b64encode(c.SerializeToString()).decode() for c in _commit("n#1")]
    return [
        json.dumps({"add": "n1", "commits_z": commits[0], "v": JOURNAL_VERSION + 1}),
        json.dumps({"add": "n2", "commits": commits, "v": JOURNAL_VERSION + 1, "x": True}),
        json.dumps({"hold": "n3", "v": JOURNAL_VERSION + 1}),
    ]


def test_a_newer_versions_lines_are_neither_billed_nor_dropped_but_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback leaves lines of a later journal version: this build does not know what their
    fields mean, so it reads none of them as an entry (before: one dropped as unreadable, its
    bill lost, the other billed under this build's reading) and keeps each in the file, byte
    for byte, when its own entries are settled (the file was emptied) and when it is
    rewritten (a compaction), for a router of that version; ERROR says so at the load."""
    newer = _newer_lines()
    path = tmp_path / JOURNAL_NAME
    path.write_text(newer[0] + "\n" + json.dumps({"add": "a", "commits": [], "v": 2}) + "\n")
    with path.open("a") as handle:
        handle.write("\n".join(newer[1:]) + "\n")
    journal = Journal(tmp_path, compact_bytes=1)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        assert journal.load() == ["a"]
    assert journal.newer == 3 and journal.pending_count == 1
    assert any(
        "3 lines" in r.getMessage() and "newer router" in r.getMessage() for r in caplog.records
    )
    journal.done("a")  # its bill settled: nothing of this version is pending
    journal.sync()
    assert path.read_text().splitlines()[:1] == [newer[0]]  # not emptied
    for i in range(20):  # settled lines that outweigh the live ones
        journal.add(f"b{i}", _commit(f"b{i}#1"))
        journal.done(f"b{i}")
    journal.add("c", _commit("c#1"))
    journal.sync()  # compacted: the pending line and the newer ones, nothing else
    journal.close()
    lines = path.read_text().splitlines()
    assert lines[:3] == newer and [json.loads(line)["add"] for line in lines[3:]] == ["c"]
    again = Journal(tmp_path)
    assert again.load() == ["c"] and again.newer == 3
    again.close()


@pytest.mark.parametrize(
    "damaged",
    ['{"add": "x", "commits": [], "v": ' + "9" * 5_000 + "}", "[" * 200_000 + "]" * 200_000],
    ids=["number-past-4300-digits", "nested-past-the-recursion-limit"],
)
def test_a_line_python_cannot_parse_is_unreadable_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damaged: str
) -> None:
    """A damaged line that is JSON Python will not read (a number of over 4,300 digits, a
    nesting past the recursion limit) stopped the router's start with a ValueError or
    RecursionError (a review's find): it is an unreadable line, as any other damage, and the
    entries around it are billed."""
    path = tmp_path / JOURNAL_NAME
    good = [json.dumps({"add": name, "commits": [], "v": 2}) for name in ("a", "b")]
    path.write_text("\n".join([good[0], damaged, good[1]]) + "\n")
    journal = Journal(tmp_path)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        assert journal.load() == ["a", "b"]
    journal.close()
    assert any("is unreadable" in r.getMessage() for r in caplog.records)


def test_a_newer_versions_line_is_settled_or_replaced_by_a_later_line_of_its_id(
    tmp_path: Path,
) -> None:
    """A newer router that ran on the file after it settled or rewrote such an entry: its
    later line of that id wins, as any later line does."""
    newer = _newer_lines()
    later = [json.dumps({"done": "n1"}), json.dumps({"add": "n2", "commits": [], "v": 2})]
    (tmp_path / JOURNAL_NAME).write_text("\n".join([*newer, *later]) + "\n")
    journal = Journal(tmp_path)
    assert journal.load() == ["n2"] and journal.newer == 1
    journal.close()


def test_the_kept_lines_are_said_by_version_and_count_and_maybe_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bit flip in a line's "v" (2 -> 6) keeps it for ever as a newer router's: the ERROR
    said "3 entries ... written by a newer router" (a done line is no entry, and no version
    named). It names each version with its count, counts lines, and says that without a router
    of that version ever run on the directory the line is damaged."""
    lines = [
        json.dumps({"add": "a", "commits": [], "v": 6}),  # a version-2 line, its "v" flipped
        json.dumps({"done": "x", "v": JOURNAL_VERSION + 1}),
        json.dumps({"add": "b", "commits": [], "v": JOURNAL_VERSION + 1}),
    ]
    (tmp_path / JOURNAL_NAME).write_text("\n".join(lines) + "\n")
    journal = Journal(tmp_path)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        assert journal.load() == []
    journal.close()
    (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "3 lines of" in said and "entries" not in said
    assert f"(version {JOURNAL_VERSION + 1} (x2), version 6 (x1))" in said
    assert "if no router of that version ever ran on this directory, the line is damaged" in said


def test_a_compaction_keeps_a_newer_versions_lines_in_their_order(tmp_path: Path) -> None:
    """A newer router's add n1, done n1, add n1: n1 pending for it. A compaction wrote its
    kept lines in the order their ids first came (add, done: n1 read as settled by the newer
    router, its bill lost); a later line of an id takes its place at the end now."""
    later = JOURNAL_VERSION + 1
    lines = [
        json.dumps({"add": "n1", "commits": [], "v": later}),
        json.dumps({"done": "n1", "v": later}),
        json.dumps({"add": "n1", "commits": ["again"], "v": later}),
    ]
    path = tmp_path / JOURNAL_NAME
    path.write_text("\n".join(lines) + "\n")
    journal = Journal(tmp_path, compact_bytes=1)
    assert journal.load() == [] and journal.newer == 2
    for i in range(5):  # settled lines that outweigh the live ones
        journal.add(f"b{i}", _commit(f"b{i}#1"))
        journal.done(f"b{i}")
    journal.add("c", _commit("c#1"))
    journal.sync()
    journal.close()
    kept = path.read_text().splitlines()
    assert kept[:2] == lines[1:] and [json.loads(line).get("add") for line in kept[2:]] == ["c"]


async def test_a_write_waited_for_as_written_does_not_wait_for_its_fsync(tmp_path: Path) -> None:
    """An open call's line must be in the file before its WARM goes out (a process kill keeps
    it); its fsync, which a slow disk may take long over, is not waited for."""

    class SlowSync(Journal):
        def __init__(self, directory: Path) -> None:
            super().__init__(directory)
            self.may_sync = threading.Event()

        def sync(self, *, fsync: bool = True) -> None:
            assert self.may_sync.wait(timeout=10)
            super().sync(fsync=fsync)

    journal = SlowSync(tmp_path)
    journal.load()
    thread = JournalThread(journal)
    added = partial(journal.add, "o", _final("o#1", 0), None, open_call=True)
    await asyncio.wait_for(thread.submit(added, written=True), timeout=5)
    assert '"open": true' in (tmp_path / JOURNAL_NAME).read_text()  # in, not yet fsynced
    durable = thread.submit(partial(journal.add, "a", _commit("a#1")), durable=True)
    await asyncio.sleep(0.01)
    assert not durable.done()  # a durable one waits for the fsync
    journal.may_sync.set()
    await asyncio.wait_for(durable, timeout=5)
    journal.close()


async def test_a_batch_no_write_of_which_waits_to_be_durable_costs_no_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model call journals its open call and, once settled, a "done" line: neither waits
    for an fsync, so a batch of them makes none; a durable write's batch fsyncs them all."""
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    journal = Journal(tmp_path)
    journal.load()
    thread = JournalThread(journal)
    monkeypatch.setattr("services.router.outbox_journal.os.fsync", counting_fsync)
    opened = partial(journal.add, "o", _final("o#1", 0), None, open_call=True)
    await asyncio.wait_for(thread.submit(opened, written=True), timeout=5)
    await asyncio.wait_for(thread.submit(partial(journal.done, "o")), timeout=5)
    assert synced == []
    durable = thread.submit(partial(journal.add, "a", _commit("a#1")), durable=True)
    await asyncio.wait_for(durable, timeout=5)
    assert len(synced) == 1
    journal.close()


async def test_lines_no_bill_waits_for_are_fsynced_within_the_sync_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open call's line skips its batch's fsync, but not for long: with no durable write
    coming, the thread fsyncs it ``sync_within_s`` later (a host crash loses at most that much
    of the running calls' lines), once however many batches came meanwhile; with 0, every
    batch is fsynced as it is written."""
    synced: list[int] = []
    fsynced = threading.Event()
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)
        fsynced.set()

    journal = Journal(tmp_path)  # its file made (and its directory fsynced) before counting
    journal.load()
    monkeypatch.setattr("services.router.outbox_journal.os.fsync", counting_fsync)
    thread = JournalThread(journal, sync_within_s=0.05)
    for n in range(3):
        opened = partial(journal.add, f"o{n}", _final(f"o{n}#1", 0), None, open_call=True)
        await asyncio.wait_for(thread.submit(opened, written=True), timeout=5)
    assert synced == []  # not with its batch
    assert await asyncio.to_thread(fsynced.wait, 5)  # but soon after
    await asyncio.sleep(0.2)  # nothing written since: no second fsync
    assert len(synced) == 1
    journal.close()

    every = Journal(tmp_path / "every")
    every.load()
    immediate = JournalThread(every, sync_within_s=0.0)
    fsynced.clear()
    opened = partial(every.add, "o", _final("o#1", 0), None, open_call=True)
    await asyncio.wait_for(immediate.submit(opened, written=True), timeout=5)
    assert await asyncio.to_thread(fsynced.wait, 5)
    every.close()


async def test_a_queue_that_never_empties_still_fsyncs_within_the_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delayed fsync's timer is set once the queue empties; under a steady stream of open
    calls it may never empty, so a batch that comes ``sync_within_s`` after the oldest
    unfsynced write is fsynced itself (the clock here, not the timer, says when)."""
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    journal = Journal(tmp_path)  # its file made (and its directory fsynced) before counting
    journal.load()
    monkeypatch.setattr("services.router.outbox_journal.os.fsync", counting_fsync)
    now = [0.0]
    thread = JournalThread(journal, sync_within_s=600.0, monotonic=lambda: now[0])
    for n in range(5):
        opened = partial(journal.add, f"o{n}", _final(f"o{n}#1", 0), None, open_call=True)
        await asyncio.wait_for(thread.submit(opened, written=True), timeout=5)
        now[0] += 100.0
    assert synced == []  # 400 s since the first write, the timer (600 s) not yet due
    now[0] += 200.0
    opened = partial(journal.add, "late", _final("late#1", 0), None, open_call=True)
    await asyncio.wait_for(thread.submit(opened, written=True), timeout=5)
    await asyncio.wait_for(thread.call(journal.pending), timeout=5)  # that batch has run
    assert len(synced) == 1  # the batch 600 s after the oldest write fsynced them all
    journal.close()


async def test_a_sticky_fsync_failure_is_not_tried_at_every_batch_and_said_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fails every fsync (EIO) for ten minutes while open calls are journalled every
    half second and the delayed fsync comes due each second. A failed fsync is sticky: no
    later fsync of that file proves anything, only a fresh file fsynced does, so the journal
    does not fsync it at every batch (before: 2,400 failing fsyncs, each of which a failing
    disk may take long over, holding the open calls' lines the WARMs wait for), and tries the
    rewrite with a growing delay (1 s, doubled to 30 s). The failure is said once as it starts,
    then once a minute with how many syncs failed, and once when it is over (before: 1,200
    ERROR lines). A bill that must be durable meanwhile is refused, as before."""
    now = [0.0]
    journal = Journal(tmp_path, monotonic=lambda: now[0])
    journal.load()
    failed: list[int] = []  # the metric
    thread = JournalThread(
        journal, sync_within_s=1.0, monotonic=lambda: now[0], sync_failed=failed.append
    )
    await thread.call(partial(journal.add, "a", _commit("a#1")), durable=True)
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        fsyncs.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("services.router.outbox_journal.os.fsync", failing_fsync)
    with caplog.at_level(logging.INFO, logger="cachemesh.router.outbox"):
        for step in range(1200):
            now[0] += 0.5
            opened = partial(journal.add, f"o{step}", _final(f"o{step}#1", 0), None, open_call=True)
            await asyncio.wait_for(thread.call(opened), timeout=5)
            if step % 2:  # the delayed fsync's timer comes due
                due = thread._sync_due
                assert due is not None  # still set: it drives the retries with no traffic
                due.cancel()
                thread._sync_now()
                await asyncio.wait_for(thread.call(journal.pending), timeout=5)
        with pytest.raises(JournalError):
            await thread.call(partial(journal.add, "b", _commit("b#1")), durable=True)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(fsyncs) <= 30, f"{len(fsyncs)} fsyncs tried"  # 25: 1, then the rewrites'
        assert len(errors) <= 13, f"{len(errors)} ERROR lines"  # 11: 2 at first, then 1 a min
        assert sum(failed) >= 1200  # each batch's sync that failed, counted
        assert "still cannot write or make its writes durable" in errors[-1]

        monkeypatch.setattr("services.router.outbox_journal.os.fsync", real_fsync)  # back
        now[0] += 30.0  # the longest the next rewrite waits
        await thread.call(partial(journal.add, "c", _commit("c#1")), durable=True)
    journal.close()
    assert "durable again" in caplog.text
    again = Journal(tmp_path)
    assert {"a", "b", "c"} <= set(again.load())  # b refused, but written: billed all the same
    again.close()


def test_a_new_journal_file_is_durable_in_its_directory_before_any_line_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal file made at start-up: fsyncing its lines does not make its own entry in the
    directory durable, so after a power cut the file, and the acknowledged bills in it, could be
    gone; the directory is fsynced once it is made (a journal already there costs none)."""
    synced = record_fsyncs(monkeypatch)
    directory = tmp_path / "router"
    directory.mkdir()
    journal = Journal(directory)
    journal.load()
    journal.add("e1", _commit("r1#1"))
    journal.sync()
    assert directory in synced
    assert synced.index(directory) < synced.index(directory / JOURNAL_NAME)
    journal.close()
    synced.clear()
    Journal(directory).close()
    assert directory not in synced
