"""The queue-full line counts "N since the last count of them said": drops the collector's
return line counted (``dropped meanwhile: ... at a full queue``) are not counted again by the
next queue-full line, those before the outage included (a drop within the interval, not said,
then the outage). ``ExportHealth`` alone, its clock injected."""

from __future__ import annotations

import logging

import pytest

from services.common.clock import ManualClock
from services.common.otlp_wire import DROPPED_LINE_EVERY_S, ExportHealth


def test_drops_counted_by_the_collector_s_return_are_not_counted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    health = ExportHealth("http://127.0.0.1:4317", clock=clock)
    health.dropped()  # the first: said
    health.dropped()  # within the interval: not said, left to count
    health.exported(False, 4)  # an outage
    health.exported(True, 4)  # its end: "2 at a full queue"
    clock.advance(s=DROPPED_LINE_EVERY_S)
    health.dropped()
    messages = [r.getMessage() for r in caplog.records]
    back = [m for m in messages if "takes spans again" in m]
    assert len(back) == 1 and "2 at a full queue" in back[0], messages
    full = [m for m in messages if "span queue is full" in m]
    assert len(full) == 2 and ", 1 since the last count of them said" in full[1], full
