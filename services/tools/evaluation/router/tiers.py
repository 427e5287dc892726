"""Calibrating the thresholds of tiers between small and large (``calibrate --tier-share``).

The labels know two models only (a weak and a strong one), so a tier between has no quality
of its own here: its threshold is calibrated for a share of calls (the share sent to that tier
or a dearer one), and the expected quality is given as bounds: the prompts it receives
answered as the small model answered them (lower) or as the large one did (upper). The cost
is each prompt's tokens and the cost model's output at the configured table's prices
(``CACHEMESH_MODELS_FILE``, ``CACHEMESH_AUTO_TIERS``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.common.models import LARGEST, SMALLEST, ModelTable, Tier
from services.router.routing.bands import bands
from services.tools.evaluation.router.metrics import threshold_for_share
from services.tools.evaluation.router.session import Prompts


class TierShareError(ValueError):
    """A --tier-share names no tier between small and large, or a share outside [0, 1]."""


def parse_tier_shares(value: str, table: ModelTable) -> dict[Tier, float]:
    middle = [t for t in table.tiers if t not in (SMALLEST, LARGEST)]
    out: dict[Tier, float] = {}
    for item in value.split(","):
        tier, sep, figure = item.strip().partition("=")
        try:
            share = float(figure)
        except ValueError:
            share = -1.0
        if not sep or tier not in middle or not 0.0 <= share <= 1.0:
            named = ", ".join(middle) or "none: the configured table has two tiers"
            raise TierShareError(
                f"--tier-share: expected tier=share (0-1) for a tier between small and large "
                f"(the table's: {named}), got {item.strip()[:64]!r}"
            )
        out[tier] = share
    return out


def calibrate_tiers(
    prompts: Prompts,
    scores: npt.NDArray[np.float64],
    table: ModelTable,
    large_threshold: float,
    shares: dict[Tier, float],
) -> dict[str, object]:
    """Each tier's threshold for its share, and the routed set's cost and quality bounds."""
    specs = [table.for_tier(t) for t in table.tiers]
    configured = {tier: threshold_for_share(scores, share) for tier, share in shares.items()}
    cuts = bands(specs, large_threshold, configured)
    index = np.zeros(len(scores), dtype=np.int64)
    for i, band in enumerate(cuts):
        index[scores >= band.threshold] = i + 1
    cost = np.zeros(len(scores))
    for i, spec in enumerate(specs):
        cost = np.where(index == i, prompts.nanos_on(spec), cost)
    last = len(specs) - 1
    between = (index > 0) & (index < last)
    weak, strong = prompts.weak.astype(float), prompts.strong.astype(float)
    sure = np.where(index == last, strong, weak)
    return {
        "thresholds": {b.tier: round(b.threshold, 6) for b in cuts},
        "sources": {b.tier: b.source for b in cuts},
        "shares": {t: round(float((index == i).mean()), 4) for i, t in enumerate(table.tiers)},
        "cost_of_all_large": round(float(cost.sum() / prompts.nanos_on(specs[-1]).sum()), 4),
        "quality_low": round(float(sure.mean()), 4),
        "quality_high": round(float(np.where(between, strong, sure).mean()), 4),
        "large_quality": round(float(strong.mean()), 4),
    }


def describe(result: dict[str, object]) -> str:
    thresholds = result["thresholds"]
    shares = result["shares"]
    assert isinstance(thresholds, dict) and isinstance(shares, dict)
    middle = ",".join(f"{t}={v}" for t, v in thresholds.items() if t != LARGEST)
    return (
        f"bands: {', '.join(f'{t} from {v:.4f}' for t, v in thresholds.items())}; calls: "
        f"{', '.join(f'{t} {v:.1%}' for t, v in shares.items())}; expected cost "
        f"{result['cost_of_all_large']:.1%} of all-large; quality between "
        f"{result['quality_low']:.4f} and {result['quality_high']:.4f} (large alone "
        f"{result['large_quality']:.4f}; the labels do not know the tiers between)\n"
        f"set ROUTER_TIER_THRESHOLDS={middle}"
    )
