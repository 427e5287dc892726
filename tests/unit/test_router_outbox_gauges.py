"""The billing outbox's backlog is seen on /metrics: ``cachemesh_router_outbox_pending`` (the
bills kept now) and ``cachemesh_router_outbox_oldest_age_seconds`` (since the oldest was first
kept, on the outbox's wall clock; 0 when none), read at each scrape through the real outbox."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.router.metrics import RouterMetrics
from services.router.outbox import Backlog, BillingOutbox
from services.router.outbox_journal import Counted, Journal, JournalError
from tests.unit.test_router_outbox import FakePrefix, _commits
from tests.unit.test_router_outbox_disk import FullDisk


def _gauges(registry: CollectorRegistry) -> tuple[float | None, float | None]:
    return (
        registry.get_sample_value("cachemesh_router_outbox_pending"),
        registry.get_sample_value("cachemesh_router_outbox_oldest_age_seconds"),
    )


def _watched(outbox: BillingOutbox) -> CollectorRegistry:
    registry = new_registry()
    RouterMetrics(registry, TenantLabels(4)).outbox_backlog(outbox.backlog)
    return registry


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "journal"])
async def test_kept_bills_are_counted_with_their_oldest_age_then_zero_once_replayed(
    on_disk: bool, tmp_path: Path
) -> None:
    wall = ManualClock()
    prefix = FakePrefix()
    journal = Journal(tmp_path) if on_disk else None
    outbox = BillingOutbox(prefix, journal, 1.0, 0.01, wall=wall)
    registry = _watched(outbox)
    assert _gauges(registry) == (0, 0)
    await outbox.keep(_commits("a#1"), estimate_nanos=10)
    wall.advance(s=30)
    await outbox.keep(_commits("b#1"), estimate_nanos=20)
    assert await outbox.flush() == 0  # prefix-cache down: both kept
    wall.advance(s=15)
    assert _gauges(registry) == (2, 45)  # the oldest, a#1, kept 45 s ago
    prefix.down = False
    assert await outbox.flush() == 2
    assert _gauges(registry) == (0, 0)
    await outbox.close()


async def test_entries_an_earlier_process_journalled_age_from_this_processs_start(
    tmp_path: Path,
) -> None:
    wall = ManualClock()
    prefix = FakePrefix()
    journal = Journal(tmp_path)
    first = BillingOutbox(prefix, journal, 1.0, 0.01, wall=wall)
    await first.keep(_commits("a#1"), estimate_nanos=10)
    await first.close()
    journal.close()  # a router stopped with prefix-cache down: its bill stays journalled
    wall.advance(s=100)
    second = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01, wall=wall)
    registry = _watched(second)
    wall.advance(s=7)
    assert _gauges(registry) == (1, 7)  # a lower bound: its keep time is on disk, not read
    wall.advance(s=10)
    await second.keep(_commits("b#1"), estimate_nanos=10)
    wall.advance(s=3)
    assert _gauges(registry) == (2, 20)  # the inherited one is still the oldest
    prefix.down = False
    assert await second.flush() == 2
    assert _gauges(registry) == (0, 0)
    await second.close()


async def test_running_calls_whose_open_failed_do_not_hide_a_kept_bill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk and prefix-cache down: one bill held in memory, then 3 model calls whose
    open-call lines could not be written (in ``_live``, never in the journal). The held bill is
    still pending: the gauges, the replay rounds' gate and the refusal of new calls
    (``cannot_keep``) count it. Before: count 1 minus 3 live ids read 0 pending, age 0."""
    wall = ManualClock()
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01, wall=wall)
    registry = _watched(outbox)
    FullDisk(monkeypatch)
    with pytest.raises(JournalError, match="held in memory"):
        await outbox.keep(_commits("a#1"), estimate_nanos=10)
    opened = [outbox.open(_commits(f"o#{n}")) for n in range(3)]
    for one in opened:
        assert one is not None
        with pytest.raises(JournalError):
            await one[1]
    wall.advance(s=5)
    assert _gauges(registry) == (1, 5)
    assert outbox.pending == 1 and outbox.cannot_keep


class GatedJournal(Journal):
    """Its lines are written once ``gate`` is set (the journal's thread waits for it)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate = threading.Event()
        self.gate.set()

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
        self.gate.wait(10)
        super().add(
            entry_id, commits, carrier, open_call=open_call, started_ms=started_ms, counted=counted
        )


async def test_a_running_call_not_yet_journalled_does_not_hide_a_kept_bill(
    tmp_path: Path,
) -> None:
    """An open call's id is live as soon as ``open`` returns, its line written later by the
    journal's thread: in between, the kept bill is still the one pending."""
    prefix = FakePrefix()
    journal = GatedJournal(tmp_path)
    outbox = BillingOutbox(prefix, journal, 1.0, 0.01)
    await outbox.keep(_commits("a#1"), estimate_nanos=10)
    journal.gate.clear()
    opened = outbox.open(_commits("o#1"))
    assert opened is not None
    await asyncio.sleep(0.05)
    assert not opened[1].done()
    assert outbox.pending == 1  # its line not written yet
    journal.gate.set()
    await opened[1]
    assert outbox.pending == 1  # written: the running call is not pending
    outbox.release(opened[0])
    assert outbox.pending == 2  # no longer this process's to settle: a round bills it
    prefix.down = False
    assert await outbox.flush() == 2
    assert outbox.pending == 0
    await outbox.close()


def test_the_gauges_are_described_so_a_second_registration_fails_at_start() -> None:
    """``OutboxGauges.describe`` names its two families without reading the outbox: the
    registry knows them, and registering them twice raises at start-up, not a scrape serving
    each name twice."""
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    read: list[int] = []

    def backlog() -> Backlog:
        read.append(1)
        return Backlog(0, 0.0)

    metrics.outbox_backlog(backlog)
    assert read == []  # described, not collected, at registration
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.outbox_backlog(backlog)


class DoneFailsOnce(Journal):
    """Its first "done" fails before it settles the entry (as a batch that cannot start)."""

    fail = True

    def done(self, entry_id: str) -> None:
        if self.fail:
            self.fail = False
            raise OSError("can't start new thread")
        super().done(entry_id)


async def test_an_entry_whose_done_failed_keeps_its_age_until_really_gone(
    tmp_path: Path,
) -> None:
    """prefix-cache takes a kept bill but its "done" does not run: the entry stays pending
    until a round does its "done" again, and keeps the age of its first keep (before: its keep
    time was dropped with the first "done": alone, age 0)."""
    wall = ManualClock()
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, DoneFailsOnce(tmp_path), 1.0, 0.01, wall=wall)
    registry = _watched(outbox)
    await outbox.keep(_commits("a#1"), estimate_nanos=10)
    wall.advance(s=10)
    prefix.down = False
    assert await outbox.flush() == 1  # billed; its "done" failed
    wall.advance(s=5)
    assert _gauges(registry) == (1, 15)
    sent = len(prefix.sent)
    assert await outbox.flush() == 0  # its "done" again, not its commits
    assert len(prefix.sent) == sent
    assert _gauges(registry) == (0, 0)
    await outbox.close()
