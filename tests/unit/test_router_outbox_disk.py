"""The billing outbox's journal on a disk that fills up or loses the file: a bill the journal
cannot take is held in memory (not dropped) until prefix-cache or the journal takes it; no
model call is paid while neither can; write failures are counted and said once an interval;
a journal file removed under the router is rewritten from what it holds."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import stat
from functools import partial
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.env import ConfigError
from services.common.errors import Code, RequestError
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import JOURNAL_NAME, Journal, JournalError
from services.router.outbox_journal_thread import JournalThread
from services.router.pipeline import Pipeline
from tests.unit.test_router_outbox import FakePrefix as OutboxPrefix
from tests.unit.test_router_outbox import _commits, _kept
from tests.unit.test_router_pipeline import FakePrefix, Rig, _request


class FullDisk:
    """Every ``pwrite`` fails with ENOSPC while ``full`` (the journal's writes: a full tmpfs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = True
        self.refused = 0
        real = os.pwrite

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if self.full:
                self.refused += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)


def _finals(commits: list[pc.CommitRequest]) -> list[str]:
    return [c.request_id for c in commits if c.phase == pc.COMMIT_PHASE_FINAL]


async def test_a_full_journal_with_prefix_cache_down_pays_one_model_call_and_bills_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewed outage: ROUTER_DATA_DIR full (ENOSPC) and prefix-cache down. Before: each
    answer was refused after its model call, no bill kept, and the Python client's 5 tries of
    one ask() were 5 model calls (0 billed once both came back). Now the first call's bill is
    held in memory and its answer served (its caller pays for it; billed once prefix-cache is
    back); the requests after it are refused before their model call, naming
    ROUTER_DATA_DIR."""
    prefix = FakePrefix(down=True)
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    rig = Rig(prefix=prefix, outbox=outbox)
    pipeline = rig.pipeline()
    disk = FullDisk(monkeypatch)
    first = await _answer(pipeline)
    assert first.served_by == pb.LAYER_MODEL and first.cost.estimated
    refusals: list[RequestError] = []
    for _ in range(4):  # the next requests, while the disk is full and prefix-cache down
        with pytest.raises(RequestError) as caught:
            [chunk async for chunk in pipeline.run("tenant-a", _request())]
        refusals.append(caught.value)
    await pipeline.drain()
    assert [r.code for r in refusals] == [Code.UNAVAILABLE] * 4
    assert len(rig.models.calls) == 1, f"{len(rig.models.calls)} model calls paid"
    assert "ROUTER_DATA_DIR" in refusals[-1].message
    assert str(tmp_path) not in refusals[-1].message  # the router's paths stay in its log
    assert outbox.pending == 1, "the paid call's bill was dropped"

    disk.full = False
    prefix.down = False
    before = len(prefix.commits)
    assert await outbox.flush() == 1
    billed = _finals(prefix.commits[before:])
    assert len(billed) == 1 and billed[0].startswith("r1#"), billed  # the one call, once
    assert outbox.pending == 0
    assert (await _answer(pipeline)).served_by == pb.LAYER_MODEL  # model calls resume


async def _answer(pipeline: Pipeline) -> pb.CompleteResponse:
    return [chunk async for chunk in pipeline.run("tenant-a", _request())][-1].end


async def test_a_bill_held_in_memory_moves_to_the_journal_once_the_disk_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefix-cache still down when the disk has room again: the next replay round writes the
    held bill into the journal (durable: a restart bills it), and the outbox takes bills again."""
    prefix = OutboxPrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    disk = FullDisk(monkeypatch)
    with pytest.raises(JournalError, match="held in memory") as caught:
        await outbox.keep(_commits("a#1"), 1000)
    assert caught.value.written  # billed if the router lives
    assert outbox.pending == 1 and outbox.cannot_keep
    assert await outbox.flush() == 0 and outbox.cannot_keep  # the disk still full
    disk.full = False
    assert await outbox.flush() == 0  # prefix-cache down: nothing billed, the bill on disk
    assert _kept(tmp_path) == ["a#1"]
    assert outbox.pending == 1 and not outbox.cannot_keep
    prefix.down = False
    assert await outbox.flush() == 1 and outbox.pending == 0


async def test_bills_held_in_memory_at_shutdown_are_logged_and_counted_as_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The router stops with prefix-cache down and its disk still full: the held bills are
    lost with the process, each said at ERROR with its tenant and estimate, and counted."""
    dropped: list[int] = []
    outbox = BillingOutbox(OutboxPrefix(), Journal(tmp_path), 1.0, 0.01, dropped=dropped.append)
    FullDisk(monkeypatch)
    for key in ("a#1", "b#1"):
        with pytest.raises(JournalError):
            await outbox.keep(_commits(key), 4_321_000)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        await outbox.close()
    lost = [r.getMessage() for r in caplog.records if "is lost" in r.getMessage()]
    assert len(lost) == 2 and all("tenant t" in m and "4321000" in m for m in lost), lost
    assert sum(dropped) == 2


async def test_bills_of_an_outbox_in_memory_lost_at_shutdown_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No ROUTER_DATA_DIR: the bills still held at shutdown were said at ERROR, now also
    counted (before: the metric stayed 0)."""
    dropped: list[int] = []
    outbox = BillingOutbox(OutboxPrefix(), None, 1.0, 0.01, dropped=dropped.append)
    await outbox.keep(_commits("a#1"), 1000)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        await outbox.close()
    assert "no ROUTER_DATA_DIR" in caplog.text and sum(dropped) == 1


async def test_write_failures_are_counted_and_said_once_an_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk fails the journal's writes, not its fsyncs: each failed write is counted
    (cachemesh_router_journal_sync_failures_total, the alert's metric; before: 0) and the
    failure is said at ERROR once as it starts, then once a minute; the per-call WARNING of an
    open call that could not be written is throttled (before: one a model call)."""
    now = [0.0]
    journal = Journal(tmp_path, monotonic=lambda: now[0])
    journal.load()
    failed: list[int] = []
    thread = JournalThread(
        journal, sync_within_s=1.0, monotonic=lambda: now[0], sync_failed=failed.append
    )
    FullDisk(monkeypatch)
    final = [pc.CommitRequest(tenant="t", request_id="o#1", phase=pc.COMMIT_PHASE_FINAL)]
    with caplog.at_level(logging.INFO, logger="cachemesh.router.outbox"):
        for step in range(240):  # two minutes of an open call each half second
            now[0] += 0.5
            opened = partial(journal.add, f"o{step}", final, None, open_call=True)
            with pytest.raises(JournalError):
                await thread.call(opened)
    assert sum(failed) == 240
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 3, [r.getMessage() for r in errors]
    assert thread.failing
    journal.close()


async def test_an_open_call_that_cannot_be_written_is_said_once_an_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ages = ManualClock()
    outbox = BillingOutbox(OutboxPrefix(), Journal(tmp_path), 1.0, 0.01, ages=ages)
    FullDisk(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="cachemesh.router.outbox"):
        for _ in range(50):
            opened = outbox.open(_commits("o#1"))
            assert opened is not None
            await asyncio.gather(opened[1], return_exceptions=True)
            await asyncio.sleep(0)  # its done callback
            outbox.release(opened[0])
    warned = [r for r in caplog.records if "journalling a running model call" in r.getMessage()]
    assert len(warned) == 1, f"{len(warned)} WARNING lines"


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_journal_file_removed_while_the_router_runs_is_rewritten_from_what_it_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """prefix-cache down, two answers kept, then billing-outbox.jsonl is removed (or another
    file put in its place). Before: the next entries went on into the unlinked file, and the
    next start found no bills (2 lost, nothing said). Now the next journal batch finds the file
    gone, rewrites it from the entries the router holds, says it at ERROR once and counts it."""
    failed: list[int] = []
    outbox = BillingOutbox(
        OutboxPrefix(), Journal(tmp_path), 1.0, 0.01, journal_sync_failed=failed.append
    )
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    path = tmp_path / JOURNAL_NAME
    path.unlink()
    if how == "replaced":
        path.write_text("")
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        await outbox.keep(_commits("c#1"))
        await outbox.keep(_commits("d#1"))
    assert _kept(tmp_path) == ["a#1", "b#1", "c#1", "d#1"]
    said = [r for r in caplog.records if "removed or replaced" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert sum(failed) >= 1


async def test_a_data_directory_removed_while_the_router_runs_is_made_again_and_locked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """prefix-cache down, two answers kept, then the whole ROUTER_DATA_DIR is removed. Before:
    every rewrite failed (its directory gone), no write was durable again until a restart,
    which found no bills, and a second router could start on the directory. Now the next
    journal batch makes it again (0700), rewrites the bills it holds and takes the lock again."""
    data = tmp_path / "router"
    journal = Journal(data)
    outbox = BillingOutbox(OutboxPrefix(), journal, 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    shutil.rmtree(data)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        await outbox.keep(_commits("c#1"))
        await outbox.keep(_commits("d#1"))
    assert _kept(data) == ["a#1", "b#1", "c#1", "d#1"]
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    said = [r.getMessage() for r in caplog.records if "made again" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    with pytest.raises(ConfigError, match="another router is using"):
        Journal(data)
    await outbox.close()
    journal.close()
