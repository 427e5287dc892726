"""The billing outbox against a fake prefix-cache port: kept durably, replayed in order until
acknowledged, a torn journal line ignored, a final refusal dropped, any other kept; its
entries on disk (not in memory), concurrent keeps sharing an fsync, a failed fsync sticky, the
journal rewritten when settled lines outweigh pending ones."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as cm
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.router.dependencies import CallFailed
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import (
    JOURNAL_NAME,
    Counted,
    Journal,
    JournalError,
)
from services.router.outbox_journal_thread import JournalThread
from services.tools.stack.supervisor import Backoff


class FakePrefix:
    def __init__(self) -> None:
        self.down = True
        self.refuse: Code | None = None
        self.sent: list[tuple[str, int]] = []

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        raise AssertionError("the outbox never plans")

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if self.down:
            raise CallFailed(Code.UNAVAILABLE, "down")
        if self.refuse is not None:
            raise CallFailed(self.refuse, "no")
        self.sent.append((request.request_id, request.phase))
        return pc.CommitResponse()


def _commits(key: str) -> list[pc.CommitRequest]:
    return [
        pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_WARM),
        pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_FINAL),
    ]


async def test_kept_until_prefix_cache_is_back_then_billed_in_order(tmp_path: Path) -> None:
    prefix = FakePrefix()
    first = Journal(tmp_path)
    outbox = BillingOutbox(prefix, first, 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    assert await outbox.flush() == 0 and outbox.pending == 2
    first.close()  # a router that died now replays its journal when it starts again
    journal = Journal(tmp_path)
    again = BillingOutbox(prefix, journal, 1.0, 0.01)
    assert again.pending == 2
    prefix.down = False
    assert await again.flush() == 2 and again.pending == 0
    warm, final = pc.COMMIT_PHASE_WARM, pc.COMMIT_PHASE_FINAL
    assert prefix.sent == [("a#1", warm), ("a#1", final), ("b#1", warm), ("b#1", final)]
    assert (tmp_path / JOURNAL_NAME).read_text() == ""  # emptied once nothing is pending
    journal.close()
    assert BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01).pending == 0


async def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await BillingOutbox(FakePrefix(), journal, 1.0, 0.01).keep(_commits("a#1"))
    with (tmp_path / JOURNAL_NAME).open("a") as handle:
        handle.write('{"add": "x", "commits": ["AAA')  # the crash came mid-append
    journal.close()
    assert BillingOutbox(FakePrefix(), Journal(tmp_path), 1.0, 0.01).pending == 1


async def test_a_final_refusal_is_dropped_not_retried_forever(tmp_path: Path) -> None:
    prefix = FakePrefix()
    dropped: list[int] = []
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01, dropped=dropped.append)
    await outbox.keep(_commits("a#1"))
    prefix.down, prefix.refuse = False, Code.INVALID_ARGUMENT
    assert await outbox.flush() == 0 and outbox.pending == 0 and dropped == [1]  # not billed


@pytest.mark.parametrize(
    "code",
    [Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.INTERNAL, Code.RESOURCE_EXHAUSTED],
)
async def test_a_refusal_that_may_pass_keeps_the_entry(tmp_path: Path, code: Code) -> None:
    """E.g. the internal token rejected during a rotation: billing is kept, not dropped."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    prefix.down, prefix.refuse = False, code
    assert await outbox.flush() == 0 and outbox.pending == 1
    prefix.refuse = None
    assert await outbox.flush() == 1 and prefix.sent[-1] == ("a#1", pc.COMMIT_PHASE_FINAL)


async def test_an_entry_refused_for_now_does_not_hold_back_the_ones_after_it(
    tmp_path: Path,
) -> None:
    class OneBad(FakePrefix):
        async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
            if request.request_id == "a#1":
                raise CallFailed(Code.INTERNAL, "a bug on this one")
            return await super().commit(request, deadline_s)

    prefix = OneBad()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    prefix.down = False
    assert await outbox.flush() == 1 and outbox.pending == 1  # b billed, a kept
    assert [rid for rid, _ in prefix.sent] == ["b#1", "b#1"]


class SlowJournal(Journal):
    def add(
        self,
        entry_id: str,
        commits: Sequence[pc.CommitRequest],
        carrier: Mapping[str, str] | None = None,
        *,
        open_call: bool = False,
        started_ms: int | None = None,
        counted: Counted | None = None,
    ) -> None:
        # written ...
        super().add(
            entry_id, commits, carrier, open_call=open_call, started_ms=started_ms, counted=counted
        )
        time.sleep(0.05)  # ... and the thread returns a little later (a slow disk)


class SlowPrefix(FakePrefix):
    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        await asyncio.sleep(0.01)
        return await super().commit(request, deadline_s)


def _kept(directory: Path) -> list[str]:
    """The request ids of the entries a router starting now would bill, in order (read from
    a copy of the journal: the router of ``directory`` may still hold it)."""
    with tempfile.TemporaryDirectory() as copy:
        shutil.copyfile(directory / JOURNAL_NAME, Path(copy) / JOURNAL_NAME)
        journal = Journal(Path(copy))
        try:
            return [journal.read(entry_id)[0].request_id for entry_id in journal.load()]
        finally:
            journal.close()


async def test_an_entry_kept_while_the_last_one_settles_stays_in_the_journal(
    tmp_path: Path,
) -> None:
    """The flush that settles the last pending entry empties the journal; an entry whose line
    was appended meanwhile must survive it (it was fsynced before its answer went out)."""
    prefix = SlowPrefix()
    outbox = BillingOutbox(prefix, SlowJournal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    prefix.down = False
    flush = asyncio.ensure_future(outbox.flush())
    await asyncio.sleep(0.005)
    await outbox.keep(_commits("b#1"))  # deferred while a#1 is being billed
    await flush
    assert outbox.pending == 1
    assert _kept(tmp_path) == ["b#1"]


async def test_an_entry_kept_after_a_torn_line_survives_the_next_restart(tmp_path: Path) -> None:
    """A line appended after a torn one must not be glued to it (both would be unreadable)."""
    journal = Journal(tmp_path)
    await BillingOutbox(FakePrefix(), journal, 1.0, 0.01).keep(_commits("a#1"))
    with (tmp_path / JOURNAL_NAME).open("a") as handle:
        handle.write('{"add": "x", "commits": ["AAA')  # the crash came mid-append
    journal.close()
    restarted = BillingOutbox(FakePrefix(), Journal(tmp_path), 1.0, 0.01)
    await restarted.keep(_commits("b#1"))
    assert _kept(tmp_path) == ["a#1", "b#1"]


def _large_commits(key: str, size: int) -> list[pc.CommitRequest]:
    request = cm.CompleteRequest(request_id=key)
    request.messages.add(role=cm.ROLE_USER).content.add(text="x" * size)
    return [pc.CommitRequest(tenant="t", request_id=key, request=request)]


def _resident_bytes() -> int:
    """This process's resident memory (the requests' protobuf objects are not Python
    allocations: tracemalloc does not see them)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def test_kept_entries_wait_on_disk_not_in_memory(tmp_path: Path) -> None:
    """An outage of prefix-cache costs disk: 200 answers of 100 kB prompts (20 MB of commits,
    held in memory they grew it by 20.6 MB) add little to the router's memory, and are billed
    whole when it is back."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_large_commits("warm-up#1", 100_000))
    before = _resident_bytes()
    for i in range(200):
        await outbox.keep(_large_commits(f"r{i}#1", 100_000))
    grown = _resident_bytes() - before
    assert outbox.pending == 201 and grown < 6_000_000, grown
    prefix.down = False
    got: list[int] = []

    async def commit(request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        got.append(len(request.request.messages[0].content[0].text))
        return pc.CommitResponse()

    prefix.commit = commit  # type: ignore[method-assign]
    assert await outbox.flush() == 201 and got == [100_000] * 201


async def test_concurrent_keeps_share_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During an outage every answer waits for its entry's fsync: answers kept together share
    one, so a slow disk does not serialize the gateway."""
    outbox = BillingOutbox(FakePrefix(), Journal(tmp_path), 1.0, 0.01)
    fsyncs = 0
    real_fsync = os.fsync

    def counted(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        time.sleep(0.01)  # a slow disk
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    await asyncio.gather(*(outbox.keep(_commits(f"r{i}#1")) for i in range(50)))
    assert outbox.pending == 50 and fsyncs <= 5, fsyncs
    assert len(_kept(tmp_path)) == 50


def _failing_fsync(
    monkeypatch: pytest.MonkeyPatch, times: int, on_directories: bool = False
) -> None:
    """The next ``times`` fsyncs (of directories only, if ``on_directories``) fail with EIO."""
    real_fsync = os.fsync
    left = [times]

    def fsync(fd: int) -> None:
        if left[0] and (not on_directories or stat.S_ISDIR(os.fstat(fd).st_mode)):
            left[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


async def test_after_a_failed_fsync_nothing_is_acknowledged_until_a_fresh_file_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the kernel may have dropped the pages: a later fsync of the same
    file that succeeds proves nothing. The next write rewrites the journal into a fresh file
    (fsynced, renamed, its directory fsynced) before it is acknowledged; while that fails too,
    keeps are refused. The entry whose keep failed is billed all the same (its model call was
    made)."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    _failing_fsync(monkeypatch, 1)
    with pytest.raises(JournalError, match="Input/output error") as caught:
        await outbox.keep(_commits("b#1"))
    assert caught.value.written
    _failing_fsync(monkeypatch, 1, on_directories=True)  # the rewrite's last step fails
    with pytest.raises(JournalError, match="after rewriting the journal"):
        await outbox.keep(_commits("c#1"))
    await outbox.keep(_commits("d#1"))  # rewritten again, every fsync through: acknowledged
    assert _kept(tmp_path) == ["a#1", "b#1", "c#1", "d#1"]
    prefix.down = False
    assert await outbox.flush() == 4 and outbox.pending == 0
    assert (tmp_path / JOURNAL_NAME).stat().st_size == 0


async def test_a_short_write_is_finished_not_acknowledged_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OS may write part of a buffer (a full disk, a file size limit): the rest is
    written, never a half line acknowledged."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    real_pwrite = os.pwrite
    short = [True]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if short and short.pop():
            return real_pwrite(fd, data[: len(data) // 2], offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    assert _kept(tmp_path) == ["a#1", "b#1"]


async def test_a_full_disk_holds_the_keep_in_memory_and_leaves_no_half_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    real_pwrite = os.pwrite
    full = [True]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if full and full.pop():
            real_pwrite(fd, data[:10], offset)  # some of it landed, then the disk was full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(JournalError, match=r"No space left.*held in memory") as caught:
        await outbox.keep(_commits("b#1"))
    assert caught.value.written  # not durable (its answer refused), but billed if it lives
    await outbox.keep(_commits("c#1"))
    assert _kept(tmp_path) == ["a#1", "c#1"]
    assert outbox.pending == 3
    prefix.down = False
    assert await outbox.flush() == 3


async def test_an_entry_whose_caller_left_during_its_write_is_billed(tmp_path: Path) -> None:
    """The client hung up while its answer's commits were being written: they are in the
    journal, and so billed (its model call was made), and the journal empties after."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, SlowJournal(tmp_path), 1.0, 0.01)
    task = asyncio.ensure_future(outbox.keep(_commits("a#1")))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # the write goes on
    prefix.down = False
    assert await outbox.flush() == 1 and prefix.sent[-1] == ("a#1", pc.COMMIT_PHASE_FINAL)
    assert (tmp_path / JOURNAL_NAME).stat().st_size == 0


async def test_a_batch_that_cannot_start_fails_its_calls_not_the_queue_nor_the_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread to run a batch on (thread exhaustion): its calls fail (a bill then held in
    memory for the replay), the calls queued behind it still run, and the replay loop lives
    on."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    real = asyncio.to_thread
    fail = [True]

    async def to_thread(run: Callable[..., object], *args: object) -> object:
        await asyncio.sleep(0.01)  # the batch in flight ...
        if fail and fail.pop():
            raise RuntimeError("can't start new thread")  # ... fails to run
        return await real(run, *args)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    first = asyncio.ensure_future(outbox.keep(_commits("a#1")))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(outbox.keep(_commits("b#1")))  # queued behind it
    with pytest.raises(JournalError, match="can't start new thread"):
        await asyncio.wait_for(first, 2)
    await asyncio.wait_for(second, 2)
    prefix.down = False
    runner = asyncio.ensure_future(outbox.run())
    await asyncio.sleep(0.2)
    assert not runner.done() and prefix.sent == [
        ("b#1", pc.COMMIT_PHASE_WARM),
        ("b#1", pc.COMMIT_PHASE_FINAL),
        ("a#1", pc.COMMIT_PHASE_WARM),
        ("a#1", pc.COMMIT_PHASE_FINAL),
    ]
    runner.cancel()


async def test_a_settled_entry_stays_settled_when_a_keep_shares_its_batch(tmp_path: Path) -> None:
    """The last pending entry settled and a new one kept in the same batch: the settled one's
    line must say so (a restart would bill it again after the commit records expire)."""
    journal = Journal(tmp_path)
    thread = JournalThread(journal)
    await thread.call(partial(journal.add, "A", _commits("a#1")), durable=True)
    slow = thread.submit(partial(time.sleep, 0.05))  # a batch in flight: the next two queue
    await asyncio.sleep(0.01)
    settled = thread.submit(partial(journal.done, "A"))
    kept = thread.submit(partial(journal.add, "B", _commits("b#1")), durable=True)
    await asyncio.gather(slow, settled, kept)
    journal.close()
    assert _kept(tmp_path) == ["b#1"]


async def test_the_journal_is_rewritten_once_settled_lines_outweigh_pending_ones(
    tmp_path: Path,
) -> None:
    """An entry refused for days keeps the journal from emptying: it is rewritten with only
    the pending lines instead of growing with every answer kept since."""

    class RefusesA(FakePrefix):
        async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
            if request.request_id == "a#1":
                raise CallFailed(Code.INTERNAL, "a bug on this one")
            return await super().commit(request, deadline_s)

    prefix = RefusesA()
    prefix.down = False
    outbox = BillingOutbox(prefix, Journal(tmp_path, compact_bytes=4096), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    for i in range(200):
        await outbox.keep(_commits(f"r{i}#1"))
        await outbox.flush()
    assert outbox.pending == 1
    await outbox.keep(_commits("z#1"))
    assert (tmp_path / JOURNAL_NAME).stat().st_size < 3 * 4096
    assert _kept(tmp_path) == ["a#1", "z#1"]


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0, stable_after_s=30.0)
    assert [backoff.after_exit(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.after_exit(31.0) == 0.5


async def test_a_failed_rewrite_is_tried_again_a_second_later_and_forgotten_once_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync every write tries to rewrite the journal; a rewrite that fails
    too (here: its file cannot be made) is tried again a second later, not at every write nor
    only once the file has doubled, and an emptied journal forgets it: a failed fsync in a
    later outage is put behind at the next write."""
    now = [0.0]
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path, monotonic=lambda: now[0]), 1.0, 0.01)
    for i in range(5):
        await outbox.keep(_commits(f"a{i}#1"))
    blocker = tmp_path / "billing-outbox.compacting"
    blocker.mkdir()  # the rewrite cannot create its file
    _failing_fsync(monkeypatch, 1)
    for key in ("b#1", "c#1"):
        with pytest.raises(JournalError):
            await outbox.keep(_commits(key))
    blocker.rmdir()  # the fault passes
    with pytest.raises(JournalError, match="earlier fsync"):
        await outbox.keep(_commits("d#1"))  # within the second: not tried again yet
    now[0] += 1.0
    await outbox.keep(_commits("e#1"))  # rewritten, fsynced: acknowledged
    prefix.down = False
    assert await outbox.flush() == 9 and outbox.pending == 0
    prefix.down = True  # a later outage
    await outbox.keep(_commits("f#1"))
    _failing_fsync(monkeypatch, 1)
    with pytest.raises(JournalError):
        await outbox.keep(_commits("g#1"))
    await outbox.keep(_commits("h#1"))  # the next write rewrites the journal at once
    assert _kept(tmp_path) == ["f#1", "g#1", "h#1"]
