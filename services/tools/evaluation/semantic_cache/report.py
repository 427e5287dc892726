"""The harness's JSON: per file and protocol, the plain embedding against the verifier."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from services.semantic_cache.verifier import Verifier, features
from services.tools.evaluation.semantic_cache.calibrate import (
    PROBABILITIES,
    THRESHOLDS,
    Point,
    baseline_at_recall,
    best_at_recall,
)
from services.tools.evaluation.semantic_cache.protocols import F64, Candidates, ProbabilityFn

CURVE = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)
RECALL_FLOORS = (0.1, 0.3, 0.5)


def probability_fn(verifier: Verifier, floor: float = THRESHOLDS[0]) -> ProbabilityFn:
    """Probabilities for (entry, query, cosine) rows; rows below ``floor`` never hit (0)."""

    def run(firsts: Sequence[str], seconds: Sequence[str], cos: F64) -> F64:
        out = np.zeros(len(cos))
        rows = [i for i in range(len(cos)) if cos[i] >= floor and firsts[i]]
        if rows:
            x = np.stack([features(firsts[i], seconds[i], float(cos[i])) for i in rows])
            out[rows] = verifier.probabilities(x)
        return out

    return run


def protocol_report(fit: Candidates, report: Candidates, shipped: Point) -> dict[str, object]:
    """Figures from the report half; per-file points are chosen on the fit half."""
    at_shipped = shipped.outcome(report)
    baseline_same_t = report.outcome(shipped.threshold, 0.0)
    baseline_eq = baseline_at_recall(report, at_shipped.recall)
    comparisons = [_comparison("shipped", shipped, report)]
    verified = [Point(t, shipped.min_probability, shipped.margin) for t in CURVE]
    for floor in RECALL_FLOORS:
        point = best_at_recall(fit, floor, PROBABILITIES[1:])
        if point is not None:
            comparisons.append(_comparison(f"fit-half recall >= {floor}", point, report))
    return {
        "baseline_curve": [{"threshold": t, **report.outcome(t, 0.0).as_dict()} for t in CURVE],
        # the same thresholds with the verification step at its shipped setting
        "verified_curve": [{**p.as_dict(), **p.outcome(report).as_dict()} for p in verified],
        "shipped": {**shipped.as_dict(), **at_shipped.as_dict()},
        "baseline_at_shipped_threshold": baseline_same_t.as_dict(),
        "baseline_at_equal_recall": baseline_eq.as_dict(),
        "at_equal_recall": comparisons,
    }


def _comparison(name: str, point: Point, report: Candidates) -> dict[str, object]:
    verified = point.outcome(report)
    baseline = baseline_at_recall(report, verified.recall)
    return {
        "point": name,
        **point.as_dict(),
        "verifier": verified.as_dict(),
        "baseline": baseline.as_dict(),
        "wrong_hits_halved": verified.wrong * 2 <= baseline.wrong
        and baseline.recall >= verified.recall,
    }


def verifier_latency_us(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> float:
    """Mean cost of one verification (features and score) in microseconds."""
    started = time.perf_counter()
    for first, second in pairs:
        verifier.probability(first, second, 0.9)
    return 1e6 * (time.perf_counter() - started) / max(len(pairs), 1)
