"""The tier decision: the learned score against each tier's threshold, moved by what each tier
costs now.

Tiers are ordered by price (small, any tiers between, large). Each tier above the smallest has
a threshold, non-decreasing up the order; the score goes to the dearest tier whose threshold it
reaches, so each tier owns a band of scores. With two tiers that is one threshold: large when
score >= threshold.

A threshold ``t`` says: paying the large model's extra price for a cold prompt is worth an
expected gain in correctness of ``t``. With the prefix cache's state the extra price of this
request differs: a conversation whose long prefix is warm on the large model and cold on the
small one may cost less on the large model, and one warm on the small model costs much more to
move. With two tiers the threshold is scaled by (large - small cost now) / (large - small cost
cold): a conversation stays on the tier that holds its prefix unless the score pays for
switching, and the reason names the costs. Both cold (a single question, no shared prefix): the
threshold is the calibrated one. A threshold <= 0 (large whenever it is no worse) is not moved.
More than two tiers: ``bands.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.models import ModelSpec, Tier


@dataclass(frozen=True)
class TierCost:
    """One tier's predicted cost for this request, from its Plan (nano-dollars)."""

    model: str
    nanos: int  # with the prefix cache's state: writes, reads, uncached input, output
    cold_nanos: int  # the same tokens with no cache of any kind
    warm_tokens: int  # prompt tokens the Plan predicts read from the cache


@dataclass(frozen=True)
class Decision:
    tier: Tier
    score: float
    threshold: float  # the one the score was held against
    base_threshold: float  # the request's or the configured one, before the costs moved it
    reason: str
    embedding_source: str
    # the costs now moved the threshold or band edges (cost-aware routing weighed a prefix):
    # the decisions metric's "cost_aware". Not ``threshold != base_threshold``: with more than
    # two tiers a smaller tier's band edge differs from the large tier's threshold by itself.
    moved_by_costs: bool = False


def tier_cost(
    spec: ModelSpec, uncached: int, written: int, read: int, output: int, amortize: int = 0
) -> TierCost:
    """``amortize``: later turns expected to read what this one writes. A written token is
    then priced as its write shared with those reads, (write + n x read) / (n + 1): the
    premium is an investment the conversation's next turns on this tier are repaid. A prompt
    over the row's long-context threshold is priced at its long-context rates."""
    prompt = uncached + written + read
    rates = spec.rates(prompt)
    write_price = rates.cache_write_5m_nanos if spec.rules == "anthropic" else rates.input_nanos
    written_nanos = (written * (write_price + amortize * rates.cache_read_nanos)) // (amortize + 1)
    return TierCost(
        model=spec.id,
        nanos=uncached * rates.input_nanos
        + written_nanos
        + read * rates.cache_read_nanos
        + output * rates.output_nanos,
        cold_nanos=spec.baseline_nanos(prompt, output),
        warm_tokens=read,
    )


def dollars(nanos: int) -> str:
    return f"${nanos / 1e9:.6f}"


def decide(
    score: float,
    threshold: float,
    source: str,
    small: TierCost | None = None,
    large: TierCost | None = None,
    *,
    requested: bool = False,
) -> Decision:
    """Two tiers. ``requested``: the threshold is the request's own (``routing.threshold``)."""
    whose = "the request's threshold" if requested else "threshold"
    if small is None or large is None or threshold <= 0:
        tier: Tier = "large" if score >= threshold else "small"
        verb = ">=" if tier == "large" else "<"
        return Decision(
            tier,
            score,
            threshold,
            threshold,
            f"score {score:.3f} {verb} {whose} {threshold:.3f}",
            source,
        )
    extra_now = large.nanos - small.nanos
    extra_cold = large.cold_nanos - small.cold_nanos
    if extra_cold <= 0:  # the table prices the large model no higher: nothing to weigh
        effective = threshold
    else:
        effective = min(1.0, max(-1.0, threshold * extra_now / extra_cold))
    tier = "large" if score >= effective else "small"
    verb = ">=" if tier == "large" else "<"
    costs = (
        f"{large.model} {dollars(large.nanos)} ({large.warm_tokens} tokens warm) vs "
        f"{small.model} {dollars(small.nanos)} ({small.warm_tokens} tokens warm)"
    )
    moved = abs(effective - threshold) >= 1e-9
    if not moved:
        reason = f"score {score:.3f} {verb} {whose} {threshold:.3f}; {costs}"
    else:
        warm = "large" if large.warm_tokens > small.warm_tokens else "small"
        if warm == tier:
            why = f"kept on the {tier} tier, whose prefix is warm: switching does not pay"
        elif large.warm_tokens == small.warm_tokens:
            why = "the extra price of the large model differs from the cold one"
        else:
            why = f"the score pays for leaving the warm {warm} tier"
        reason = (
            f"{why}: score {score:.3f} {verb} effective threshold {effective:.3f} "
            f"({whose} {threshold:.3f} x extra cost now {dollars(extra_now)} / cold "
            f"{dollars(extra_cold)}); {costs}"
        )
    return Decision(tier, score, effective, threshold, reason, source, moved)
