"""RouteLLM's router metrics over a scored set of labelled prompts.

A router sends the prompts with the highest scores to the strong model. For every share ``c``
of strong calls (0 to 1) the set's quality is the mean correctness of the model each prompt
went to; PGR(c), the performance gap recovered, is that quality less the weak model's, over the
strong model's less the weak model's. APGR is the area under PGR(c) (a random router: 0.5).
CPT(x) is the least share of strong calls reaching PGR x. Tied scores are routed as a random
router would among them (their gain is shared in proportion), so a rule with a few distinct
scores is not flattered by the rows' order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Curve:
    share: Floats  # share of strong calls, k/N for k = 0..N
    quality: Floats  # mean correctness at that share
    weak_quality: float
    strong_quality: float

    @property
    def pgr(self) -> Floats:
        gap = self.strong_quality - self.weak_quality
        if gap <= 0:
            raise ValueError("the strong model is not better than the weak one on this set")
        out: Floats = (self.quality - self.weak_quality) / gap
        return out

    def apgr(self) -> float:
        return float(np.trapezoid(self.pgr, self.share))

    def cpt(self, pgr: float) -> float:
        """The least share of strong calls recovering ``pgr`` of the gap."""
        reached = np.nonzero(self.pgr >= pgr - 1e-12)[0]
        return float(self.share[reached[0]]) if reached.size else 1.0

    def share_for_quality(self, quality: float) -> float:
        """The least share of strong calls whose quality reaches ``quality`` (1.0 if none)."""
        reached = np.nonzero(self.quality >= quality - 1e-12)[0]
        return float(self.share[reached[0]]) if reached.size else 1.0

    def quality_at(self, share: float) -> float:
        return float(np.interp(share, self.share, self.quality))


def curve(scores: Floats, weak: npt.NDArray[np.bool_], strong: npt.NDArray[np.bool_]) -> Curve:
    """The quality at each number of strong calls, highest scores first, ties shared."""
    n = len(scores)
    if n == 0 or len(weak) != n or len(strong) != n:
        raise ValueError("scores and labels must be non-empty and of one length")
    gain = strong.astype(np.float64) - weak.astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_gain = gain[order]
    cumulative = np.zeros(n + 1)
    start = 0
    while start < n:  # one group of tied scores at a time: its gain grows linearly
        end = start + 1
        while end < n and sorted_scores[end] == sorted_scores[start]:
            end += 1
        group = sorted_gain[start:end].sum()
        steps = np.arange(1, end - start + 1)
        cumulative[start + 1 : end + 1] = cumulative[start] + group * steps / (end - start)
        start = end
    weak_quality = float(weak.mean())
    return Curve(
        share=np.arange(n + 1) / n,
        quality=weak_quality + cumulative / n,
        weak_quality=weak_quality,
        strong_quality=float(strong.mean()),
    )


def threshold_for_share(scores: Floats, share: float) -> float:
    """The score threshold sending ``share`` of these prompts to the strong model
    (score >= threshold → strong); 1.0 + tiny for share 0."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within [0, 1], got {share}")
    if share <= 0.0:
        return float(np.nextafter(float(scores.max()), np.inf))
    ranked = np.sort(scores)[::-1]
    k = max(1, round(share * len(ranked)))
    return float(ranked[k - 1])
