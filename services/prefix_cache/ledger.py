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

FINAL is priced from the WARM record that stands (its model, split), so the ledger hands that
record to the caller's ``bill`` and records what it returns in the same step
(``put_final``): a ledger that knows the record already (the Redis one keeps the WARMs it
wrote until their FINAL) bills in one round trip, checking the record it priced is the one
that stands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.prefix_cache.commit_records import CommitRecord, CommitRecords, Final, Stood
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TenantTotals, TotalsLedger

# The caller's pricing of a FINAL from the live WARM record: the ``Final`` to attach, or the
# ``Stood`` (repeated) when the record carries a FINAL already; it raises a ``ValueError`` to
# refuse the FINAL (nothing is written; any other exception is a fault, raised as it is). It
# may be called more than once (a record replaced meanwhile): idempotent, each call pricing
# the record it is given; the values it sets aside for its caller (the core's closure) are its
# last call's, which stand.
Bill = Callable[[CommitRecord], Final | Stood]


@dataclass(frozen=True)
class Placed:
    """A FINAL's outcome: ``record``, the WARM record it was priced from; ``stood``, the FINAL
    that stands; ``offered``, this call's bill when it was offered to be recorded (None: the
    record carried a FINAL when it was priced, so nothing was offered)."""

    record: CommitRecord
    stood: Stood
    offered: Final | None


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
        self, tenant: str, request_id: str, now_ms: int, bill: Bill
    ) -> Placed | None:
        """Atomically: ``bill`` the unexpired record and, unless it (or the record as it stands
        when written) carries a FINAL, attach the bill, refresh the record's expiry and add
        the bill to the tenant's totals; the bill attached is always one priced from the
        record that stands. Returns the FINAL that stands (the first writer's), ``repeated``
        when it was there before (decided in the same step); None when there is no unexpired
        record. ``bill``'s ``ValueError`` refuses the FINAL, unless the record as it stands
        carries a FINAL ``bill`` returns."""
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
        self, tenant: str, request_id: str, now_ms: int, bill: Bill
    ) -> Placed | None:
        record = self._records.get(tenant, request_id, now_ms)
        if record is None:
            return None
        outcome = bill(record)
        if isinstance(outcome, Stood):
            return Placed(record, outcome, None)
        self._totals.add(tenant, outcome)
        self._records.put_final(tenant, request_id, record, outcome, now_ms)
        return Placed(record, Stood(outcome, repeated=False), outcome)

    async def totals(self, tenant: str) -> TenantTotals:
        return self._totals.get(tenant)

    async def totals_of(self, tenants: Sequence[str]) -> list[TenantTotals]:
        return [self._totals.get(tenant) for tenant in tenants]
