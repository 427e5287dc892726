"""The router evaluation's cost figures: tied scores priced as the quality curve shares them."""

from __future__ import annotations

import numpy as np
import pytest

from services.tools.evaluation.router.labels import Row
from services.tools.evaluation.router.metrics import curve
from services.tools.evaluation.router.report import at_share, routed
from services.tools.evaluation.router.session import Prompts


def _prompts(tokens: list[float]) -> Prompts:
    n = len(tokens)
    t = np.array(tokens)
    rng = np.random.default_rng(1)
    weak = rng.random(n) < 0.5
    return Prompts(
        rows=[Row(f"q{i}", "mmlu", "s", bool(weak[i]), True) for i in range(n)],
        vectors=np.zeros((n, 4), np.float32),
        shapes=np.zeros((n, 8), np.float32),
        weak=weak,
        strong=np.ones(n, dtype=bool),
        small_nanos=t * 1.0,
        large_nanos=t * 3.0,
        tokens=t,
    )


def test_a_random_routers_cost_is_a_random_routers() -> None:
    """All scores tied (random) on a file whose first rows are the long ones: the cost at a
    share is the expected cost of sending that share of every prompt large, not the first rows'."""
    prompts = _prompts([100.0] * 50 + [10.0] * 50)  # sorted like the data: long subjects first
    zeros = np.zeros(100)
    c = curve(zeros, prompts.weak, prompts.strong)
    for share in (0.3, 0.5, 0.7):
        expected = (1 + 2 * share) / 3  # small costs a third of large, on every prompt alike
        assert at_share(prompts, zeros, c, share)["cost_of_all_large"] == pytest.approx(
            expected, abs=1e-4
        )


def test_only_the_tie_group_across_the_cut_is_shared() -> None:
    scores = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0])
    got = routed(scores, 3 / 8)  # 2.0 goes; two of the four 1.0s
    assert got.tolist() == [0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0]
    assert routed(scores, 5 / 8).tolist() == [0, 1, 1, 1, 1, 1, 0, 0]  # the cut between groups
    assert routed(scores, 0.0).sum() == 0 and routed(scores, 1.0).sum() == 8


def test_the_default_thresholds_figures_name_that_threshold() -> None:
    from services.tools.evaluation.router.report import at_threshold

    prompts = _prompts([float(i + 1) for i in range(100)])
    scores = np.linspace(-1, 1, 100)
    figures = at_threshold(prompts, scores, 0.1, "95% of the large model's quality")
    assert figures["threshold"] == 0.1  # not the score of the last prompt sent large
    assert figures["large_share"] == pytest.approx((scores >= 0.1).mean())
    assert figures["calibrated_for"] == "95% of the large model's quality"
