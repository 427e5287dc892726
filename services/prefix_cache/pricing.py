"""Money in integer nano-dollars: a split's cost, the no-cache baseline, the saving. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.models import ModelSpec
from services.prefix_cache.rules import Split


@dataclass(frozen=True)
class Charge:
    cost_nanos: int
    baseline_nanos: int

    @property
    def saved_nanos(self) -> int:
        """Negative on a turn that pays a cache write."""
        return self.baseline_nanos - self.cost_nanos


def cost_nanos(split: Split, output_tokens: int, spec: ModelSpec) -> int:
    """Each part of the prompt at its own price, plus the output (Anthropic's usage billing);
    a prompt over the row's long-context threshold at its long-context prices, all of it.
    ``split`` is one request's: the threshold is a request's prompt length."""
    rates = spec.rates(split.prompt_tokens)
    return (
        split.input_tokens * rates.input_nanos
        + split.write_5m_tokens * rates.cache_write_5m_nanos
        + split.write_1h_tokens * rates.cache_write_1h_nanos
        + split.read_tokens * rates.cache_read_nanos
        + output_tokens * rates.output_nanos
    )


def baseline_nanos(prompt_tokens: int, output_tokens: int, baseline: ModelSpec) -> int:
    """The same tokens at the baseline model's base input and output prices (its
    long-context ones over their threshold), no cache."""
    return baseline.baseline_nanos(prompt_tokens, output_tokens)


def charge(split: Split, output_tokens: int, spec: ModelSpec, baseline: ModelSpec) -> Charge:
    return Charge(
        cost_nanos=cost_nanos(split, output_tokens, spec),
        baseline_nanos=baseline_nanos(split.prompt_tokens, output_tokens, baseline),
    )
