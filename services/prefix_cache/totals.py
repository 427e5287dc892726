"""Running totals per tenant: requests, usage and money, each FINAL commit counted once.

Usage and cost are the billed figures (the provider's report where one reconciled the
estimate); the drift sums reported minus estimated over the reconciled requests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.prefix_cache.commit_records import Final


@dataclass(frozen=True)
class TenantTotals:
    requests: int = 0
    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0
    kv_cached_tokens: int = 0
    cost_nanos: int = 0
    baseline_nanos: int = 0
    reconciled_requests: int = 0
    drift_prompt_tokens: int = 0
    drift_input_tokens: int = 0
    drift_cache_creation_tokens: int = 0
    drift_cache_read_tokens: int = 0
    drift_cost_nanos: int = 0
    drift_abs_prompt_tokens: int = 0


def increments(final: Final) -> dict[str, int]:
    """What one FINAL adds to its tenant's totals, by ``TenantTotals`` field: the one
    arithmetic both ledgers apply (in memory here, ``HINCRBY`` in Redis)."""
    split, est = final.split, final.estimate
    delta = {
        "requests": 1,
        "input_tokens": split.input_tokens,
        "cache_creation_input_tokens": split.creation_tokens,
        "cache_read_input_tokens": split.read_tokens,
        "output_tokens": final.output_tokens,
        "kv_cached_tokens": final.kv_cached_tokens,
        "cost_nanos": final.charge.cost_nanos,
        "baseline_nanos": final.charge.baseline_nanos,
    }
    if final.reconciled:
        drift_prompt = split.prompt_tokens - est.prompt_tokens
        delta |= {
            "reconciled_requests": 1,
            "drift_prompt_tokens": drift_prompt,
            "drift_input_tokens": split.input_tokens - est.input_tokens,
            "drift_cache_creation_tokens": split.creation_tokens - est.creation_tokens,
            "drift_cache_read_tokens": split.read_tokens - est.read_tokens,
            "drift_cost_nanos": final.charge.cost_nanos - final.estimate_charge.cost_nanos,
            "drift_abs_prompt_tokens": abs(drift_prompt),
        }
    return delta


class TotalsLedger:
    """The in-memory totals (the single-process default)."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, TenantTotals] = {}

    def add(self, tenant: str, final: Final) -> None:
        old = self._by_tenant.get(tenant, TenantTotals())
        delta = increments(final)
        self._by_tenant[tenant] = replace(
            old, **{name: getattr(old, name) + value for name, value in delta.items()}
        )

    def get(self, tenant: str) -> TenantTotals:
        return self._by_tenant.get(tenant, TenantTotals())
