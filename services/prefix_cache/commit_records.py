"""Commit records by (tenant, request_id), kept for a TTL so WARM and FINAL are idempotent."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from services.common.holdings import TenantOrder
from services.prefix_cache.pricing import Charge
from services.prefix_cache.rules import Split

# The shortest record TTL: a record must outlive the longest answer (WARM at its first token,
# FINAL at its end) and the router's billing outbox replaying both after a prefix-cache outage;
# a shorter one (0 expired every record as it was written) makes FINAL find no WARM commit, so
# the answer is never billed. An hour: beyond any answer and any short outage.
MIN_RECORD_TTL_MS = 3_600_000


@dataclass(frozen=True)
class Final:
    """What FINAL billed: ``split``/``charge`` are the provider's report when there was one
    (``reconciled``), else the estimate; the estimate is always kept beside it."""

    output_tokens: int
    kv_cached_tokens: int
    baseline_model: str
    charge: Charge
    split: Split
    estimate: Split
    estimate_charge: Charge
    reconciled: bool


@dataclass(frozen=True)
class Stood:
    """The FINAL that stands for a commit key; ``repeated``: it was recorded before this
    commit (whose own FINAL was not recorded: its reply is the recorded bill)."""

    final: Final
    repeated: bool


@dataclass(frozen=True)
class CommitRecord:
    model: str
    replica: str
    split: Split
    expires_at_ms: int
    final: Final | None = None


class CommitRecords:
    """In memory, bounded: records expire ``ttl_ms`` after their last commit, and beyond
    ``max_records`` the least recently committed record of the tenant holding the most goes:
    the bound, one for all tenants, is shared max-min fairly (``services.common.holdings``),
    so one tenant's flood of requests pushes out its own records, never those of a tenant
    holding fewer (whose FINAL would then find no WARM, or whose replayed WARM and FINAL
    would be billed again); alone, a tenant has the whole bound."""

    def __init__(self, ttl_ms: int, max_records: int = 1_000_000) -> None:
        check_record_ttl(ttl_ms)
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self._ttl_ms = ttl_ms
        self._max = max_records
        # by last commit, so by expiry (one TTL); and each tenant's request ids in that order
        self._records: OrderedDict[tuple[str, str], CommitRecord] = OrderedDict()
        self._order: TenantOrder[str] = TenantOrder()  # each tenant's request ids, in it

    def __len__(self) -> int:
        return len(self._records)

    def get(self, tenant: str, request_id: str, now_ms: int) -> CommitRecord | None:
        record = self._records.get((tenant, request_id))
        return record if record is not None and record.expires_at_ms > now_ms else None

    def put_warm(
        self, tenant: str, request_id: str, model: str, replica: str, split: Split, now_ms: int
    ) -> CommitRecord:
        record = CommitRecord(model, replica, split, now_ms + self._ttl_ms)
        self._store((tenant, request_id), record, now_ms)
        return record

    def put_final(
        self, tenant: str, request_id: str, record: CommitRecord, final: Final, now_ms: int
    ) -> CommitRecord:
        done = replace(record, final=final, expires_at_ms=now_ms + self._ttl_ms)
        self._store((tenant, request_id), done, now_ms)
        return done

    def _store(self, key: tuple[str, str], record: CommitRecord, now_ms: int) -> None:
        self._records[key] = record
        self._records.move_to_end(key)
        self._order.put(*key)
        while self._records:  # the expired first, whoever's they are
            oldest_key, oldest = next(iter(self._records.items()))
            if oldest.expires_at_ms > now_ms:
                break
            self._drop(oldest_key)
        while len(self._records) > self._max:  # then the bound: the tenant holding the most
            self._drop(self._order.next_out())

    def _drop(self, key: tuple[str, str]) -> None:
        del self._records[key]
        self._order.remove(*key)


def check_record_ttl(ttl_ms: int) -> None:
    """Refuses a record TTL under ``MIN_RECORD_TTL_MS`` (see there)."""
    if ttl_ms < MIN_RECORD_TTL_MS:
        raise ValueError(
            f"the commit record TTL must be >= {MIN_RECORD_TTL_MS} ms (an hour), got {ttl_ms} ms: "
            "a shorter one expires records before their answer's FINAL, which is then never billed"
        )
