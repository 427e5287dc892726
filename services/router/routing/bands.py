"""More than two tiers: score bands, and the cost-aware rule over them.

The tiers are the model table's ``auto`` tiers ordered by price (small, the tiers between,
large). Each tier above the smallest has a threshold; the score goes to the dearest tier whose
threshold it reaches, so each tier owns a band of scores ``[its threshold, the next one's)``.
The largest tier's threshold is the two-tier one (``ROUTER_THRESHOLD``, the card's calibrated
default, or the request's ``routing.threshold``). A tier between takes the operator's
(``ROUTER_TIER_THRESHOLDS``) or, unset, one derived from the largest's: the largest's times the
tier's price position between the ends (0 = priced as small, 1 = as large). That is the score
from which the tier's extra price over the small one is paid at the rate the two-tier threshold
pays for the large one's, were it to recover the whole gain on that score; it hands over to the
large tier at the large tier's own threshold.

Cost-aware, the bands are a utility: tier k's value is ``a_k * score - cost_k``, with slopes
set so that at cold costs each tier takes over from the one below at exactly its threshold
(``a_k - a_(k-1) = (cold_k - cold_(k-1)) / t_k``). With the costs now (the prefix cache's
state), the tier of highest value is chosen and the band's edges move as the two-tier threshold
does. With two tiers both rules are ``decision.decide``'s, which this module calls.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.models import ModelSpec, Tier
from services.router.routing.decision import Decision, TierCost, decide, dollars


@dataclass(frozen=True)
class Band:
    """A tier above the smallest and the score from which it is chosen (costs cold)."""

    tier: Tier
    threshold: float
    source: str  # "configured", "the request's", or "derived" (from the largest's, by price)


def price_position(small: ModelSpec, spec: ModelSpec, large: ModelSpec) -> float:
    """Where ``spec``'s prices lie between the small tier's and the large tier's, within
    [0, 1]: the mean of its input and output prices' positions (1 when the ends are priced
    alike)."""
    positions = [
        (mid - low) / (high - low)
        for low, mid, high in (
            (small.input_nanos, spec.input_nanos, large.input_nanos),
            (small.output_nanos, spec.output_nanos, large.output_nanos),
        )
        if high > low
    ]
    if not positions:
        return 1.0
    return min(1.0, max(0.0, sum(positions) / len(positions)))


def bands(
    tiers: Sequence[ModelSpec],
    top: float,
    configured: Mapping[Tier, float],
    *,
    requested: bool = False,
) -> list[Band]:
    """The thresholds of ``tiers[1:]`` (ordered by price). A threshold above a dearer tier's is
    lowered to it (the cheaper tier's band is then empty)."""
    small, large = tiers[0], tiers[-1]
    out = [Band(large.tier, top, "the request's" if requested else "configured")]
    floor = top
    for spec in reversed(tiers[1:-1]):
        if spec.tier in configured:
            band = Band(spec.tier, configured[spec.tier], "configured")
        else:
            band = Band(spec.tier, top * price_position(small, spec, large), "derived")
        if band.threshold > floor:
            band = Band(band.tier, floor, band.source)
        floor = band.threshold
        out.append(band)
    return out[::-1]


def _clamp(value: float) -> float:
    return min(1.0, max(-1.0, value))


def _interval(low: float, high: float) -> str:
    left = "-inf" if math.isinf(low) else f"{low:.3f}"
    right = "inf" if math.isinf(high) else f"{high:.3f}"
    return f"[{left}, {right})"


def _listing(cuts: Sequence[Band]) -> str:
    return ", ".join(f"{b.tier} {b.threshold:.3f} ({b.source})" for b in cuts)


def decide_bands(
    score: float,
    tiers: Sequence[Tier],
    cuts: Sequence[Band],
    source: str,
    costs: Sequence[TierCost | None] | None = None,
    *,
    requested: bool = False,
) -> Decision:
    """``tiers`` ordered by price, ``cuts`` their thresholds (``bands``), ``costs`` each tier's
    Plan cost (None: not weighed)."""
    top = cuts[-1].threshold
    if len(tiers) == 2:
        small, large = costs if costs is not None else (None, None)
        return decide(score, top, source, small, large, requested=requested)
    known = [c for c in costs or () if c is not None]
    cold = [c.cold_nanos for c in known]
    weigh = (
        len(known) == len(tiers)
        and all(b.threshold > 0 for b in cuts)
        and all(b > a for a, b in itertools.pairwise(cold))
    )
    edges = [b.threshold for b in cuts]
    k = max([0] + [i + 1 for i, t in enumerate(edges) if score >= t])
    cold_band = (edges[k - 1] if k else -math.inf, edges[k] if k < len(edges) else math.inf)
    if not weigh:
        held = cold_band[0] if k else edges[0]
        reason = f"score {score:.3f} in the {tiers[k]} band {_interval(*cold_band)}"
        reason += f" (thresholds: {_listing(cuts)})"
        if known:
            reason += "; " + _costs(tiers, known)
        return Decision(tiers[k], score, held, top, reason, source)
    return _weighed(score, tiers, cuts, source, known, cold_band, k)


def _weighed(
    score: float,
    tiers: Sequence[Tier],
    cuts: Sequence[Band],
    source: str,
    costs: Sequence[TierCost],
    cold_band: tuple[float, float],
    cold_tier: int,
) -> Decision:
    slopes = [0.0]
    for i, band in enumerate(cuts):
        slopes.append(slopes[-1] + (costs[i + 1].cold_nanos - costs[i].cold_nanos) / band.threshold)
    now = [c.nanos for c in costs]

    def cross(j: int, k: int) -> float:  # the score from which tier k (dearer) beats tier j
        return (now[k] - now[j]) / (slopes[k] - slopes[j])

    n = len(tiers)
    chosen = 0
    for k in range(n - 1, 0, -1):
        if score >= _clamp(max(cross(j, k) for j in range(k))):
            chosen = k
            break
    low = max((cross(j, chosen) for j in range(chosen)), default=-math.inf)
    high = min((cross(chosen, j) for j in range(chosen + 1, n)), default=math.inf)
    edges = (_clamp(low) if chosen else -math.inf, _clamp(high) if chosen < n - 1 else math.inf)
    held = edges[0] if chosen else edges[1]
    moved = chosen != cold_tier or any(
        abs(a - b) > 1e-9 for a, b in zip(edges, cold_band, strict=True) if not math.isinf(a)
    )
    where = f"score {score:.3f} in the {tiers[chosen]} band {_interval(*edges)}"
    if not moved:
        reason = f"{where} (thresholds: {_listing(cuts)}); {_costs(tiers, costs)}"
        return Decision(tiers[chosen], score, held, cuts[-1].threshold, reason, source)
    warmest = max(range(n), key=lambda i: costs[i].warm_tokens)
    alone = sum(1 for c in costs if c.warm_tokens == costs[warmest].warm_tokens) == 1
    if alone and warmest == chosen:
        why = f"kept on the {tiers[chosen]} tier, whose prefix is warm: switching does not pay"
    elif alone:
        why = f"the score pays for leaving the warm {tiers[warmest]} tier"
    else:
        why = "the tiers' extra prices now differ from the cold ones"
    reason = (
        f"{why}: {where} with the costs now (cold {_interval(*cold_band)}; thresholds: "
        f"{_listing(cuts)}); {_costs(tiers, costs)}"
    )
    return Decision(tiers[chosen], score, held, cuts[-1].threshold, reason, source, True)


def _costs(tiers: Sequence[Tier], costs: Sequence[TierCost]) -> str:
    return "costs now: " + ", ".join(
        f"{tier} {c.model} {dollars(c.nanos)} ({c.warm_tokens} tokens warm)"
        for tier, c in zip(tiers, costs, strict=True)
    )
