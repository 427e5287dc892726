"""A routing policy's point on the cost / expected-quality-loss plane, and the plain learned
router's frontier on it.

The learned score is the predicted gain in correctness of the large model over the small one
(P(large right) - P(small right)). A request sent to the small tier therefore loses, in
expectation, its score against sending it to the large one: a policy's expected loss is the
sum of the scores of the requests it sent small. Every policy is measured against always-large
(loss 0), so the loss is net and may be below 0: the score is negative where the small model is
predicted to be right more often than the large one (RouteLLM's labels, which the heads were
fitted on, hold 410 of 7,686 prompts the weak model answered and the strong one did not), and a
request sent small on such a score is a predicted gain. The plain router at threshold 0 sends
small exactly those requests, so its loss is at most 0 (-0.092 on the tools replay: one request
of 300). Each point says that part apart (``expected_gain``, ``small_predicted_better``): the
correctness given up is ``expected_loss + expected_gain``.

A score below 0 overstates the small model's edge: on the labels' held-out report half, the
shipped heads score 180 of 3,868 prompts below 0 (sum -17.1), and on those the strong model was
right alone 31 times, the weak one 27 (realised +4.0: no gain); those scored below -0.05 (110,
mean -0.143) realised -0.046 a prompt, those in [-0.05, 0) (70) +0.129. So a loss below 0 is
the estimator's (the difference of two heads, each fitted alone), not a measured gain.

Sweeping the plain learned router's threshold traces the dollars it needs for each expected
loss. A policy below that curve gets the same expected loss for fewer dollars; one above it
pays more than the plain router would for the same quality.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Served:
    """One replayed request: the tier that served it, its learned score, its bill."""

    tier: str  # "" when the request failed
    score: float | None  # None when the router did not choose (a named model)
    cost_nanos: int


@dataclass(frozen=True)
class Point:
    policy: str
    threshold: float | None  # the plain / base threshold it ran with (None: not a router)
    requests: int
    errors: int
    cost_usd: float
    large_share: float
    # net, against always-large: sum of the scores of the requests sent to the small tier
    # (below 0 when the negative ones outweigh the rest)
    expected_loss: float
    loss_per_request: float
    # the requests sent small on a negative score (the small model predicted the better), and
    # minus the sum of their scores: the part of expected_loss that is a predicted gain
    small_predicted_better: int
    expected_gain: float

    def row(self) -> dict[str, object]:
        return asdict(self)


def point(policy: str, threshold: float | None, served: list[Served], smallest: str) -> Point:
    ok = [s for s in served if s.tier]
    small = [s.score for s in ok if s.tier == smallest and s.score is not None]
    loss = float(sum(small))
    better = [score for score in small if score < 0]
    return Point(
        policy=policy,
        threshold=threshold,
        requests=len(served),
        errors=len(served) - len(ok),
        cost_usd=round(sum(s.cost_nanos for s in ok) / 1e9, 4),
        large_share=round(sum(1 for s in ok if s.tier != smallest) / max(len(ok), 1), 4),
        expected_loss=round(loss, 3),
        loss_per_request=round(loss / max(len(ok), 1), 5),
        small_predicted_better=len(better),
        expected_gain=round(float(sum(-score for score in better)), 3),
    )


def sweep_thresholds(scores: npt.NDArray[np.float64], shares: tuple[float, ...]) -> list[float]:
    """Thresholds sending about each share of these scores to the large tier, plus 0 (large
    whenever it is expected to be no worse) and 1 (small unless certain); distinct, sorted."""
    ranked = np.sort(scores)[::-1]
    out = {0.0, 1.0}
    for share in shares:
        k = max(1, round(share * len(ranked)))
        out.add(round(float(ranked[k - 1]), 6))
    return sorted(out)


def pareto(points: list[Point]) -> list[Point]:
    """The points no other point beats on both cost and loss, by increasing loss."""
    ordered = sorted(points, key=lambda p: (p.expected_loss, p.cost_usd))
    front: list[Point] = []
    for p in ordered:
        if not front or p.cost_usd < front[-1].cost_usd:
            front.append(p)
    return front


def cost_at_loss(frontier: list[Point], loss: float) -> float | None:
    """The frontier's dollars at ``loss``, linear between its two nearest points (a mix of
    the two thresholds); None when no point of the frontier reaches so small a loss."""
    front = pareto(frontier)
    if not front or loss < front[0].expected_loss:
        return None
    for left, right in itertools.pairwise(front):
        if left.expected_loss <= loss <= right.expected_loss:
            span = right.expected_loss - left.expected_loss
            share = 0.0 if span == 0 else (loss - left.expected_loss) / span
            return round(left.cost_usd + share * (right.cost_usd - left.cost_usd), 4)
    return front[-1].cost_usd  # more loss than the cheapest point: that point's cost


def loss_at_cost(frontier: list[Point], cost: float) -> float | None:
    """The frontier's expected loss at ``cost`` dollars (None below its cheapest point)."""
    front = pareto(frontier)
    if not front or cost < front[-1].cost_usd:
        return None
    for left, right in itertools.pairwise(front):
        if right.cost_usd <= cost <= left.cost_usd:
            span = left.cost_usd - right.cost_usd
            share = 0.0 if span == 0 else (left.cost_usd - cost) / span
            return round(left.expected_loss + share * (right.expected_loss - left.expected_loss), 3)
    return front[0].expected_loss
