"""What the router records of a replica whose queue is tenant-fair (``services/model/
fair_queue.py``): first reports no longer come in the order the router sent the calls (a light
tenant's prompt overtakes a flood's), but one prefill still runs at a time, so each still began
at the previous first report: the measured rate and the queued work stay true."""

from __future__ import annotations

import pytest

from services.router.replica_state import ReplicaStates

RATE = 1_000.0  # tokens a second: the replica's true prefill rate


def test_an_overtaking_first_report_keeps_the_rate_and_the_queue_true() -> None:
    states = ReplicaStates()
    flood = [states.sent("r", 2_000, 2_000, [], now=0.0) for _ in range(3)]  # tenant b
    light = states.sent("r", 500, 500, [], now=0.5)  # tenant a, sent during b's first prefill
    # queued work: every call without its first report, whatever order the replica takes
    assert states.queued_s("r", RATE, now=0.5) == pytest.approx(1.5 + 4.0 + 0.5)
    states.started("r", flood[0], 2_000, 0, now=2.0)
    states.started("r", light, 500, 0, now=2.5)  # the fair queue's next: a's, not b's second
    assert states.queued_s("r", RATE, now=2.5) == pytest.approx(4.0)
    states.started("r", flood[1], 2_000, 0, now=4.5)
    states.started("r", flood[2], 2_000, 0, now=6.5)
    rate = states.rate("r", 1.0)
    assert rate.samples == 4
    assert rate.prefill_tokens_per_s == pytest.approx(RATE)  # each timed from the report before
    assert states.queued_s("r", RATE, now=6.5) == 0.0
