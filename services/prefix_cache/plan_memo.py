"""What a Plan computed, kept briefly under a ``plan_id`` so the WARM commit reuses it.

A miss's prompt is canonicalized, tokenized and block-hashed once, at Plan; the WARM commit
that follows (after the model's prefill) names the plan instead of sending the whole request
again. Entries belong to one tenant and model, live at most ``ttl_ms`` by the injected clock,
are taken once, and the memo holds at most ``max_blocks`` in all of their ``weight`` (a KV
block hash's worth of memory, a fixed overhead a plan included: ``core.Prompt.weight``). The
budget is one for all tenants, shared max-min fairly by weight (``services.common.holdings``):
over it, the oldest plan of the tenant holding the most goes, so one tenant's flood of Plans
pushes out its own, never those of a tenant holding less (whose WARM would have to send its
request again); alone, a tenant has the whole budget. A plan that is gone (expired, evicted,
taken, or made by another prefix-cache process) is simply unknown: the caller then sends the
request itself.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from services.common.clock import Clock
from services.common.holdings import TenantOrder


class Weighted(Protocol):
    @property
    def weight(self) -> int:
        """What an entry costs against ``max_blocks`` (at least 1)."""
        ...


P = TypeVar("P", bound=Weighted)


@dataclass(frozen=True)
class _Entry(Generic[P]):
    tenant: str
    model: str
    prompt: P
    expires_ms: int


class PlanMemo(Generic[P]):
    def __init__(self, clock: Clock, *, ttl_ms: int, max_blocks: int) -> None:
        if ttl_ms < 0 or max_blocks < 0:
            raise ValueError("ttl_ms and max_blocks must be >= 0")
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._max_blocks = max_blocks
        self._entries: OrderedDict[str, _Entry[P]] = OrderedDict()
        self._order: TenantOrder[str] = TenantOrder()  # each tenant's plans and blocks
        self._blocks = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def blocks(self) -> int:
        return self._blocks

    def put(self, tenant: str, model: str, prompt: P) -> str:
        """Keeps ``prompt`` and returns its plan id ("" when the memo is off, ttl or size 0)."""
        weight = max(prompt.weight, 1)
        if self._ttl_ms == 0 or weight > self._max_blocks:
            return ""
        now = self._clock.now_ms()
        self._collect(now)
        plan_id = secrets.token_hex(12)
        self._entries[plan_id] = _Entry(tenant, model, prompt, now + self._ttl_ms)
        self._order.put(tenant, plan_id, weight)
        self._blocks += weight
        while self._blocks > self._max_blocks:  # the oldest of the tenant holding the most
            self._drop(self._order.next_out()[1])
        return plan_id if plan_id in self._entries else ""

    def held(self, plan_id: str, tenant: str, model: str) -> P | None:
        """The plan's prompt, kept, if it is still held and belongs to ``tenant`` and
        ``model`` (``take`` it once the WARM that names it is known to be valid)."""
        entry = self._entries.get(plan_id)
        if entry is None or entry.tenant != tenant or entry.model != model:
            return None
        return entry.prompt if entry.expires_ms > self._clock.now_ms() else None

    def take(self, plan_id: str, tenant: str, model: str) -> P | None:
        """The plan's prompt, once, if it is still held and belongs to ``tenant`` and ``model``."""
        entry = self._entries.get(plan_id)
        if entry is None or entry.tenant != tenant or entry.model != model:
            return None
        self._drop(plan_id)
        if entry.expires_ms <= self._clock.now_ms():
            return None
        return entry.prompt

    def _collect(self, now: int) -> None:
        # entries are in insertion order with one TTL, so the expired ones are at the front
        while self._entries:
            plan_id, entry = next(iter(self._entries.items()))
            if entry.expires_ms > now:
                break
            self._drop(plan_id)

    def _drop(self, plan_id: str) -> None:
        entry = self._entries.pop(plan_id)
        self._blocks -= max(entry.prompt.weight, 1)
        self._order.remove(entry.tenant, plan_id)
