"""bench-router's frontier: a policy's expected loss, and the plain router's cost at a loss."""

from __future__ import annotations

import numpy as np
import pytest

from services.tools.bench.router.frontier import (
    Point,
    Served,
    cost_at_loss,
    loss_at_cost,
    pareto,
    point,
    sweep_thresholds,
)


def _p(cost: float, loss: float) -> Point:
    return Point("p", None, 10, 0, cost, 0.5, loss, loss / 10, 0, 0.0)


def test_the_expected_loss_sums_the_scores_sent_small() -> None:
    served = [
        Served("small", 0.2, 100),
        Served("small", -0.05, 100),
        Served("large", 0.4, 300),
        Served("", None, 0),  # failed: not counted
        Served("large", None, 300),  # a named model: no score
    ]
    p = point("x", 0.1, served, "small")
    assert p.expected_loss == pytest.approx(0.15) and p.loss_per_request == pytest.approx(0.0375)
    # the negative score sent small is said apart: given up 0.2, gained 0.05
    assert p.small_predicted_better == 1 and p.expected_gain == pytest.approx(0.05)
    assert (p.errors, p.requests, p.large_share) == (1, 5, 0.5)
    assert p.cost_usd == pytest.approx(800 / 1e9, abs=1e-4)


def test_a_loss_below_zero_is_the_predicted_gain_of_the_requests_sent_small() -> None:
    """At threshold 0 the plain router sends small only requests whose score is below 0 (the
    small model predicted the better): its net loss against always-large is below 0, and the
    point says it is that gain (the tools replay: -0.092, one request of 300)."""
    served = [Served("small", -0.092, 100), *[Served("large", 0.1, 300)] * 299]
    p = point("plain@0.0", 0.0, served, "small")
    assert p.expected_loss == pytest.approx(-0.092)
    assert p.small_predicted_better == 1 and p.expected_gain == pytest.approx(0.092)
    assert p.expected_loss + p.expected_gain == pytest.approx(0.0)  # nothing given up


def test_the_frontier_drops_dominated_points_and_interpolates() -> None:
    points = [_p(1.0, 0.0), _p(0.8, 2.0), _p(0.9, 3.0), _p(0.4, 6.0), _p(1.1, -0.5)]
    assert [(p.cost_usd, p.expected_loss) for p in pareto(points)] == [
        (1.1, -0.5),
        (1.0, 0.0),
        (0.8, 2.0),
        (0.4, 6.0),
    ]
    assert cost_at_loss(points, 1.0) == pytest.approx(0.9)
    assert cost_at_loss(points, 4.0) == pytest.approx(0.6)
    assert cost_at_loss(points, 9.0) == pytest.approx(0.4)  # beyond the cheapest point
    assert cost_at_loss(points, -1.0) is None  # less loss than any point reaches
    assert loss_at_cost(points, 0.6) == pytest.approx(4.0)
    assert loss_at_cost(points, 0.3) is None


def test_sweep_thresholds_cover_the_shares_and_both_ends() -> None:
    scores = np.linspace(0.0, 0.99, 100)
    got = sweep_thresholds(scores, (0.1, 0.5))
    assert got[0] == 0.0 and got[-1] == 1.0
    assert (scores >= got[-2]).mean() == pytest.approx(0.1)
    assert (scores >= got[1]).mean() == pytest.approx(0.5)
