"""Operating points: a cosine threshold t and the verifier's minimum probability v.

``calibrate`` picks, on fit halves, the point of highest recall whose precision reaches the
target on every file, even counting one more wrong hit than measured, (pairwise for files with
negatives, retrieval for all-positive files) and that serves every ``MUST_SERVE`` probe and
refuses every ``MUST_REFUSE`` probe (cases the issue names). ``frontier`` says what precision is
reachable at what recall when the target is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.tools.evaluation.semantic_cache.protocols import Candidates, Outcome

THRESHOLDS = tuple(round(0.70 + 0.005 * i, 3) for i in range(59))  # 0.700 .. 0.990
PROBABILITIES = (0.0, *(round(0.05 + 0.01 * i, 2) for i in range(95)))  # 0 = no verifier
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05)
MIN_HITS = 20  # a precision measured on fewer hits says nothing
# (cached question, new question): the probes of issue 12
MUST_SERVE = (
    ("I forgot my password, how can I change it?", "How do I reset my password?"),
    ("How can I lose weight fast?", "What is the quickest way to lose weight?"),
)
MUST_REFUSE = (
    ("How do I convert EUR to USD?", "How do I convert USD to EUR?"),
    ("Is it safe to take aspirin with ibuprofen?", "Is it safe to take aspirin without ibuprofen?"),
    ("Flights from Paris to London", "Flights from London to Paris"),
    ("What is the capital of France?", "What is the capital of Germany?"),
)


@dataclass(frozen=True)
class Point:
    threshold: float
    min_probability: float
    margin: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "verifier_min_probability": self.min_probability,
            "ambiguity_margin": self.margin,
        }

    def outcome(self, c: Candidates) -> Outcome:
        return c.outcome(self.threshold, self.min_probability, self.margin)


@dataclass(frozen=True)
class Calibration:
    point: Point | None  # None = the target is unreachable
    outcomes: dict[str, Outcome]  # per file, on its fit half, at the point (or best reachable)
    reachable: list[dict[str, object]]  # the frontier when unreachable


ProbeCheck = Callable[[Point], bool]


def calibrate(
    fit_sets: dict[str, Candidates],
    target: float | dict[str, float],
    probes_ok: ProbeCheck,
    *,
    verifier: bool = True,
    min_threshold: float = 0.0,
) -> Calibration:
    """Highest mean recall meeting the target (one for every file, or one per file); ties go
    to the higher threshold."""
    targets = target if isinstance(target, dict) else {name: target for name in fit_sets}
    probabilities = PROBABILITIES if verifier else (0.0,)
    best: tuple[float, Point, dict[str, Outcome]] | None = None
    for point in _grid(probabilities, MARGINS if verifier else (0.0,)):
        if point.threshold < min_threshold:
            continue
        outcomes = {name: point.outcome(c) for name, c in fit_sets.items()}
        if not all(_meets(o, targets[name]) for name, o in outcomes.items()):
            continue
        recall = float(np.mean([o.recall for o in outcomes.values()]))
        if (best is None or recall >= best[0]) and probes_ok(point):
            best = (recall, point, outcomes)
    if best is not None:
        return Calibration(best[1], best[2], [])
    return Calibration(None, {}, frontier(fit_sets, probabilities))


def frontier(
    sets: dict[str, Candidates], probabilities: Sequence[float] = PROBABILITIES
) -> list[dict[str, object]]:
    """For each recall floor, the best precision reachable (worst file) and where. Each
    point's outcomes are computed once for all the floors (they were once a floor: five
    times the grid's 28,320 points on every file)."""
    graded = [
        (point, [point.outcome(c) for c in sets.values()])
        for point in _grid(probabilities, MARGINS)
    ]
    rows: list[dict[str, object]] = []
    for floor in (0.05, 0.1, 0.2, 0.3, 0.5):
        top: tuple[float, Point] | None = None
        for point, outcomes in graded:
            if min(o.recall for o in outcomes) < floor or min(o.hits for o in outcomes) < 1:
                continue
            worst = min(o.precision or 0.0 for o in outcomes)
            if top is None or worst > top[0]:
                top = (worst, point)
        if top is not None:
            rows.append(
                {"recall_at_least": floor, "precision": round(top[0], 4), **top[1].as_dict()}
            )
    return rows


def best_at_recall(c: Candidates, floor: float, probabilities: Sequence[float]) -> Point | None:
    """The point of highest precision with recall >= floor (chosen on a fit half)."""
    top: tuple[float, Point] | None = None
    for point in _grid(probabilities, (0.0,)):
        o = point.outcome(c)
        if o.recall >= floor and o.hits >= MIN_HITS:
            p = o.precision or 0.0
            if top is None or p > top[0]:
                top = (p, point)
    return None if top is None else top[1]


def baseline_at_recall(c: Candidates, recall: float) -> Outcome:
    """The plain embedding at the highest threshold whose recall reaches ``recall``."""
    grid = np.round(np.arange(0.5, 1.0, 0.001), 3)
    chosen = c.outcome(float(grid[0]), 0.0)
    for t in grid.tolist():
        o = c.outcome(t, 0.0)
        if o.recall < recall:
            break
        chosen = o
    return chosen


def _grid(probabilities: Sequence[float], margins: Sequence[float]) -> list[Point]:
    """Every point, the threshold varying slowest (so a later equal point has a higher one)."""
    return [Point(t, v, m) for t in THRESHOLDS for m in margins for v in probabilities]


def _meets(o: Outcome, target: float) -> bool:
    """The target holds even if one more of the hits had been wrong (a margin for a sample)."""
    return o.hits >= MIN_HITS and (o.right - 1) / o.hits >= target
