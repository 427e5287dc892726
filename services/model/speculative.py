"""Speculative decoding in the simulator (Leviathan, Kalman, Matias 2023, arXiv:2211.17192).

A step: the draft model proposes ``k`` tokens one after another, then the target model checks
all of them in one forward pass. Each draft token is kept with probability ``alpha`` (the
paper's i.i.d. assumption) until the first rejection; the target's pass always adds one token
of its own (the correction after a rejection, or a bonus token after ``k`` kept ones), so a
step yields between 1 and ``k + 1`` tokens, ``(1 - alpha^(k+1)) / (1 - alpha)`` on average.

A step costs one target decode step plus ``k`` draft decode steps, so with ``c`` the draft's
time per token over the target's, the expected wall-clock speed-up of the decode is
``E / (k c + 1)`` (the paper's Theorem 3.8). Acceptances are drawn from a generator seeded by
the answer's seed, so the same request decodes in the same steps every time. Only latency
changes: the tokens, and so the bill, are the target model's answer either way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.common.models import ModelSpec, ModelTable


@dataclass(frozen=True)
class Drafting:
    """How one target model decodes speculatively."""

    draft: ModelSpec
    tokens: int  # k, draft tokens proposed a step
    acceptance_rate: float  # alpha

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"draft tokens (k) must be > 0, got {self.tokens}")
        if not 0.0 <= self.acceptance_rate <= 1.0:
            raise ValueError(f"acceptance rate must be in [0, 1], got {self.acceptance_rate}")


@dataclass(frozen=True)
class Step:
    tokens: int  # tokens this step adds to the answer
    accepted: int  # of them, draft tokens the target kept


def drafting_for(spec: ModelSpec, table: ModelTable) -> Drafting | None:
    """The row's drafting (None: it decodes one token a step)."""
    if spec.draft_model is None or spec.draft_acceptance_rate is None:
        return None
    draft = table.get(spec.draft_model)
    if draft is None:  # the table's own validation rules this out
        raise ValueError(f"{spec.id}: draft model {spec.draft_model!r} is not in the table")
    return Drafting(draft, spec.draft_tokens, spec.draft_acceptance_rate)


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Leviathan et al. eq. (1): E[tokens a step] = (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def cost_ratio(target: ModelSpec, draft: ModelSpec) -> float:
    """c: the draft's time per token over the target's (from the two decode speeds)."""
    return target.decode_rate / draft.decode_rate


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al. Theorem 3.8: the expected wall-clock improvement of the decode."""
    return expected_tokens_per_step(alpha, k) / (k * c + 1.0)


def step_seconds(target: ModelSpec, drafting: Drafting, time_scale: float) -> float:
    """One step: k draft decode steps, then one target pass over them."""
    return (drafting.tokens / drafting.draft.decode_rate + 1.0 / target.decode_rate) * time_scale


def plan_steps(seed: bytes, output_tokens: int, drafting: Drafting) -> list[Step]:
    """The steps that decode ``output_tokens`` tokens; the last one is cut at the answer's end."""
    draws = random.Random(seed)
    steps: list[Step] = []
    remaining = output_tokens
    while remaining > 0:
        kept = 0
        while kept < drafting.tokens and draws.random() < drafting.acceptance_rate:
            kept += 1
        produced = min(kept + 1, remaining)
        steps.append(Step(tokens=produced, accepted=min(kept, produced)))
        remaining -= produced
    return steps
