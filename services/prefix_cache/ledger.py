"""Commit records and per-tenant totals behind one protocol, so FINAL bills exactly once.

A record is keyed by ``(tenant, request_id)`` and carries an absolute ``expires_at_ms``
computed from the caller's clock (the injected one), so both implementations expire records
on the same virtual time. Records and totals sit behind ONE protocol because FINAL must attach
the bill to the record and add it to the tenant's totals in one atomic step: two prefix-cache
replicas racing FINAL on one request id must add it once, and a record must never carry a
bill the totals lack (or the reverse).

- ``InMemoryLedger``: the single-process default (``CommitRecords`` + ``TotalsLedger``); each
  method runs without an ``await`` inside, so it is atomic on the event loop.
- ``RedisCommitLedger`` (``redis_ledger.py``): shared by every replica using the same Redis;
  each write is one Lua script.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.prefix_cache.commit_records import CommitRecord, CommitRecords, Final, Stood
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TenantTotals, TotalsLedger


class CommitLedger(Protocol):
    async def get(self, tenant: str, request_id: str, now_ms: int) -> CommitRecord | None:
        """The unexpired record, or None. No side effects."""
        ...

    async def put_warm(
        self, tenant: str, request_id: str, model: str, replica: str, split: Split, now_ms: int
    ) -> CommitRecord:
        """Atomically: record the WARM unless an unexpired record exists. Returns the record
        that stands (the first writer's, when several raced)."""
        ...

    async def put_final(
        self, tenant: str, request_id: str, final: Final, now_ms: int
    ) -> Stood | None:
        """Atomically: unless the record already carries a FINAL, attach ``final``, refresh
        the record's expiry and add ``final`` to the tenant's totals. Returns the FINAL that
        stands (the first writer's), ``repeated`` when it was there before (decided in the
        same step); None when there is no unexpired record."""
        ...

    async def totals(self, tenant: str) -> TenantTotals:
        """The tenant's running totals (all zero for an unknown tenant)."""
        ...

    async def totals_of(self, tenants: Sequence[str]) -> list[TenantTotals]:
        """The running totals of each of ``tenants``, in their order, read at once (one
        round trip to a shared store)."""
        ...


class InMemoryLedger:
    def __init__(self, records: CommitRecords, totals: TotalsLedger) -> None:
        self._records = records
        self._totals = totals

    async def get(self, tenant: str, request_id: str, now_ms: int) -> CommitRecord | None:
        return self._records.get(tenant, request_id, now_ms)

    async def put_warm(
        self, tenant: str, request_id: str, model: str, replica: str, split: Split, now_ms: int
    ) -> CommitRecord:
        existing = self._records.get(tenant, request_id, now_ms)
        if existing is not None:
            return existing
        return self._records.put_warm(tenant, request_id, model, replica, split, now_ms)

    async def put_final(
        self, tenant: str, request_id: str, final: Final, now_ms: int
    ) -> Stood | None:
        record = self._records.get(tenant, request_id, now_ms)
        if record is None:
            return None
        if record.final is not None:
            return Stood(record.final, repeated=True)
        self._totals.add(tenant, final)
        self._records.put_final(tenant, request_id, record, final, now_ms)
        return Stood(final, repeated=False)

    async def totals(self, tenant: str) -> TenantTotals:
        return self._totals.get(tenant)

    async def totals_of(self, tenants: Sequence[str]) -> list[TenantTotals]:
        return [self._totals.get(tenant) for tenant in tenants]
