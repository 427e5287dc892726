"""Running totals per tenant: requests, usage and money, each FINAL commit counted once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.prefix_cache.pricing import Charge
from services.prefix_cache.rules import Split


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


class TotalsLedger:
    def __init__(self) -> None:
        self._by_tenant: dict[str, TenantTotals] = {}

    def add(
        self, tenant: str, split: Split, output_tokens: int, kv_cached_tokens: int, charge: Charge
    ) -> None:
        old = self._by_tenant.get(tenant, TenantTotals())
        self._by_tenant[tenant] = replace(
            old,
            requests=old.requests + 1,
            input_tokens=old.input_tokens + split.input_tokens,
            cache_creation_input_tokens=old.cache_creation_input_tokens + split.creation_tokens,
            cache_read_input_tokens=old.cache_read_input_tokens + split.read_tokens,
            output_tokens=old.output_tokens + output_tokens,
            kv_cached_tokens=old.kv_cached_tokens + kv_cached_tokens,
            cost_nanos=old.cost_nanos + charge.cost_nanos,
            baseline_nanos=old.baseline_nanos + charge.baseline_nanos,
        )

    def get(self, tenant: str) -> TenantTotals:
        return self._by_tenant.get(tenant, TenantTotals())
