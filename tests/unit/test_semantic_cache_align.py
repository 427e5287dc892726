"""The token-alignment check's scoring, on hand-made states and labels."""

from __future__ import annotations

import numpy as np
import pytest

from services.semantic_cache.embedder import Vectors, l2_normalise
from services.tools.evaluation.semantic_cache.align import alignment_f1, precision_at_recall


def unit(*rows: list[float]) -> Vectors:
    m = np.array(rows, dtype=np.float32)
    return l2_normalise(m)


def test_identical_token_states_align_fully_and_a_missing_token_costs_recall() -> None:
    a = unit([1, 0, 0], [0, 1, 0])
    assert alignment_f1(a, a) == pytest.approx(1.0)
    b = unit([1, 0, 0])  # the second side lacks a's second token
    # recall (a's tokens matched in b): (1 + 0) / 2; precision (b's in a): 1
    assert alignment_f1(a, b) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert alignment_f1(a, unit([0, 0, 1])) == pytest.approx(0.0)
    assert alignment_f1(a, np.zeros((0, 3), dtype=np.float32)) == 0.0


def test_precision_at_recall_serves_the_best_scores_until_the_floor() -> None:
    score = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([True, False, True, False])
    assert precision_at_recall(score, labels, 0.5) == {
        "recall_at_least": 0.5,
        "precision": 1.0,
        "wrong": 0,
    }
    assert precision_at_recall(score, labels, 1.0)["wrong"] == 1  # the 0.8 negative is passed
