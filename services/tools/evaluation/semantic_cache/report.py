"""The harness's JSON: per file and protocol, the plain embedding against the verifier."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.semantic_cache.verifier import Verifier
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
            out[rows] = verifier.probabilities_of(
                [firsts[i] for i in rows], [seconds[i] for i in rows], [float(cos[i]) for i in rows]
            )
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
    """Mean cost of verifying one candidate (features, cross-encoder, score) in microseconds,
    one call per candidate as a lookup makes it."""
    started = time.perf_counter()
    for first, second in pairs:
        verifier.probability(first, second, 0.9)
    return 1e6 * (time.perf_counter() - started) / max(len(pairs), 1)


def threshold_at_recall(c: Candidates, recall: float) -> float:
    """The threshold ``baseline_at_recall`` picks (the plain embedding at equal recall)."""
    grid = np.round(np.arange(0.5, 1.0, 0.001), 3)
    chosen = float(grid[0])
    for t in grid.tolist():
        if c.outcome(t, 0.0).recall < recall:
            break
        chosen = t
    return chosen


def subset(c: Candidates, mask: npt.NDArray[np.bool_]) -> Candidates:
    return Candidates(
        c.cos[mask], c.prob[mask], c.right[mask], c.exact[mask], c.exact_right[mask], c.label[mask]
    )


def by_category(
    report: Candidates, categories: Sequence[str], shipped: Point
) -> dict[str, dict[str, object]]:
    """Pairwise, per category of the generated pairs: the shipped setting against the plain
    embedding at the threshold that gives it the same recall over the whole report half."""
    plain_t = threshold_at_recall(report, shipped.outcome(report).recall)
    names = np.array(categories)
    out: dict[str, dict[str, object]] = {}
    for name in sorted(set(categories)):
        part = subset(report, names == name)
        out[name] = {
            "pairs": int((names == name).sum()),
            "verifier": shipped.outcome(part).as_dict(),
            "plain_embedding": {"threshold": plain_t, **part.outcome(plain_t, 0.0).as_dict()},
        }
    return out
