"""The billing outbox's backlog is seen on /metrics: ``cachemesh_router_outbox_pending`` (the
bills kept now) and ``cachemesh_router_outbox_oldest_age_seconds`` (since the oldest was first
kept, on the outbox's wall clock; 0 when none), read at each scrape through the real outbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from tests.unit.test_router_outbox import FakePrefix, _commits


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
