"""One router's figures on a labelled set: APGR, CPT, and the cost at a quality target."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.tools.evaluation.router.metrics import Curve, curve, threshold_for_share
from services.tools.evaluation.router.session import Prompts

SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def routed(scores: npt.NDArray[np.float64], share: float) -> npt.NDArray[np.float64]:
    """How much of each prompt a router sends to the large model at ``share``: 1 or 0, and for
    the group of tied scores that straddles the cut the same fraction of each, as the quality
    curve shares ties (a router of few distinct scores is priced as a random pick among its
    ties, not by the file's order: it is sorted by source and subject)."""
    k = round(share * len(scores))
    order = np.argsort(-scores, kind="stable")
    to_large = np.zeros(len(scores))
    to_large[order[:k]] = 1.0
    if 0 < k < len(scores) and scores[order[k - 1]] == scores[order[k]]:
        tied = scores == scores[order[k]]
        above = int(np.count_nonzero(scores > scores[order[k]]))
        to_large[tied] = (k - above) / int(np.count_nonzero(tied))
    return to_large


def at_share(
    prompts: Prompts, scores: npt.NDArray[np.float64], c: Curve, share: float
) -> dict[str, float]:
    quality = c.quality_at(share)
    return {
        "large_share": round(share, 4),
        "threshold": round(threshold_for_share(scores, share), 6),
        "quality": round(quality, 4),
        "of_large_quality": round(quality / c.strong_quality, 4),
        "pgr": round((quality - c.weak_quality) / (c.strong_quality - c.weak_quality), 4),
        "cost_of_all_large": round(prompts.cost_share(routed(scores, share)), 4),
    }


def at_threshold(
    prompts: Prompts, scores: npt.NDArray[np.float64], threshold: float, target: object
) -> dict[str, object]:
    """The figures of routing at ``threshold`` (score >= threshold → large), which they name."""
    c = curve(scores, prompts.weak, prompts.strong)
    share = float((scores >= threshold).mean())
    return {**at_share(prompts, scores, c, share), "threshold": threshold, "calibrated_for": target}


def summary(prompts: Prompts, scores: npt.NDArray[np.float64]) -> dict[str, object]:
    c = curve(scores, prompts.weak, prompts.strong)
    share95 = c.share_for_quality(0.95 * c.strong_quality)
    at95 = at_share(prompts, scores, c, share95)
    return {
        "apgr": round(c.apgr(), 4),
        "cpt50": round(c.cpt(0.5), 4),
        "cpt80": round(c.cpt(0.8), 4),
        "at_95pct_of_large_quality": {
            **at95,
            "cost_saved_vs_all_large": round(1.0 - at95["cost_of_all_large"], 4),
        },
        "by_share": [at_share(prompts, scores, c, s) for s in SHARES],
    }


def set_facts(prompts: Prompts) -> dict[str, object]:
    c = curve(np.zeros(len(prompts.rows)), prompts.weak, prompts.strong)
    return {
        "prompts": len(prompts.rows),
        "small_quality": round(c.weak_quality, 4),
        "large_quality": round(c.strong_quality, 4),
        "small_cost_of_all_large": round(prompts.cost_share(np.zeros(len(prompts.rows), bool)), 4),
    }
