"""How long before its call's deadline a model replica ends an answer still running (and a call
whose provider reported its prompt, no token yet): long enough for its last chunks and status
to reach the router first, even on a short deadline, where 5% of it is a few milliseconds."""

from __future__ import annotations

import pytest

from services.common.deadlines import END_MARGIN_S, end_margin_s


@pytest.mark.parametrize(
    ("deadline_s", "margin_s"),
    [
        (300.0, 0.25),  # ROUTER_MODEL_TIMEOUT_S: the margin's ceiling
        (5.0, 0.25),
        (1.9, 0.095),  # a client's 2 s, less the router's reply margin: 5% of it
        (1.0, 0.05),
        (0.45, 0.05),  # a client's 0.5 s: the floor, not 5% (22.5 ms)
        (0.09, 0.045),  # shorter than twice the floor: half of it
        (0.0, 0.0),
        (-1.0, 0.0),  # already past
    ],
)
def test_the_end_margin(deadline_s: float, margin_s: float) -> None:
    assert end_margin_s(deadline_s) == pytest.approx(margin_s)


def test_the_router_takes_any_margin_for_the_deadlines_cut() -> None:
    """The router's slack for an interrupted end at the deadline is ``END_MARGIN_S``: no margin
    is longer."""
    assert max(end_margin_s(d / 100) for d in range(0, 100_000, 7)) <= END_MARGIN_S
