"""Commit records and per-tenant totals in Redis, shared by several prefix-cache replicas.

A record is a hash ``{expires_at_ms, warm, final}`` under
``<prefix>:rec:{<tenant hash>}:<request id hash>``; a tenant's totals are a hash of
``TenantTotals`` fields under ``<prefix>:totals:{<tenant hash>}``. The braces put a tenant's
records and totals in one cluster slot, so one script may touch both.

``expires_at_ms`` is computed from the caller's ``now_ms`` (the injected clock) and decides
whether a record is live; Redis's key expiry (``PEXPIRE``: the record's TTL plus a slack) only
collects garbage. Totals never expire.

WARM is one Lua script (record unless a live record exists, return the one that stands);
FINAL is one Lua script (attach the bill unless one is attached, then ``HINCRBY`` every totals
field), so two replicas racing on one request id add it to the totals exactly once.

FINAL is priced from the WARM record, so it needs the record before its script. A replica
keeps the WARM records it wrote (or found standing) until their FINAL (``_Hints``, bounded):
a FINAL on the replica of its WARM is priced from that copy and sent at once, the script
attaching it only if the record's WARM is still the copy's (byte for byte) and returning the
record as it stands otherwise, to be priced again: one round trip a FINAL instead of a read
and a write (~0.4-0.5 ms of a miss), and the bill attached is always one priced from the
record that stands. A FINAL without a copy (another replica's WARM, a restart, the copy
evicted) reads the record first, as before.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

from redis.asyncio import Redis

from services.prefix_cache.commit_records import CommitRecord, Final, Stood, check_record_ttl
from services.prefix_cache.ledger import Bill, Placed
from services.prefix_cache.pricing import Charge
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TenantTotals, increments

GC_SLACK_MS = 60_000
TOTALS_PIPELINE = 100  # tenants' totals read in one pipeline (totals_of)
# WARM records kept for their FINAL (``_Hints``): ~1 kB each (tracemalloc), so at most ~8 MB;
# beyond a replica's answers in flight (one evicted only costs its FINAL the read before it)
FINAL_HINTS = 8_192
_TOTAL_FIELDS = frozenset(f.name for f in fields(TenantTotals))

# KEYS: the record. ARGV: now_ms, warm JSON, expires_at_ms, GC slack.
# Returns {expires_at_ms, warm JSON, final JSON or ''} of the record that stands.
_PUT_WARM = """
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'expires_at_ms', 'warm', 'final')
if v[1] and tonumber(v[1]) > now then return {v[1], v[2], v[3] or ''} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'expires_at_ms', ARGV[3], 'warm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) - now + tonumber(ARGV[4]))
return {ARGV[3], ARGV[2], ''}
"""

# KEYS: the record, the tenant's totals. ARGV: now_ms, final JSON, expires_at_ms, GC slack,
# the WARM JSON the FINAL was priced from, then totals field, increment, ... Returns
# {'missing'}; {'other', expires_at_ms, warm JSON, final JSON or ''}: the record's WARM is not
# the one priced (nothing written: price it again); {'done', final JSON that stands}: a
# repeated FINAL; or {'won', final JSON}: only 'won' touched the totals.
_PUT_FINAL = """
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'expires_at_ms', 'warm', 'final')
if not v[1] or not v[2] or tonumber(v[1]) <= now then return {'missing'} end
if v[2] ~= ARGV[5] then return {'other', v[1], v[2], v[3] or ''} end
if v[3] then return {'done', v[3]} end
redis.call('HSET', KEYS[1], 'final', ARGV[2], 'expires_at_ms', ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) - now + tonumber(ARGV[4]))
for i = 6, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
return {'won', ARGV[2]}
"""


@dataclass(frozen=True)
class _Warm:
    """A WARM record and its stored JSON (what the FINAL script compares)."""

    record: CommitRecord
    raw: bytes


class _Hints:
    """The WARM records this replica wrote or found standing, by (tenant, request id), until
    their FINAL: at most ``FINAL_HINTS``, the oldest WARM dropped first. A copy is only a
    guess: the FINAL script checks it against the record that stands."""

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._warms: OrderedDict[tuple[str, str], _Warm] = OrderedDict()

    def __len__(self) -> int:
        return len(self._warms)

    def get(self, key: tuple[str, str]) -> _Warm | None:
        return self._warms.get(key)

    def put(self, key: tuple[str, str], warm: _Warm) -> None:
        self._warms[key] = warm
        self._warms.move_to_end(key)
        while len(self._warms) > self._bound:
            self._warms.popitem(last=False)

    def drop(self, key: tuple[str, str]) -> None:
        self._warms.pop(key, None)


class RedisCommitLedger:
    def __init__(
        self,
        client: Redis,
        ttl_ms: int,
        prefix: str = "cachemesh:commit",
        final_hints: int = FINAL_HINTS,
    ) -> None:
        check_record_ttl(ttl_ms)
        if final_hints < 0:
            raise ValueError(f"final_hints must be >= 0, got {final_hints}")
        self._client = client
        self._ttl_ms = ttl_ms
        self._prefix = prefix
        self._hints = _Hints(final_hints)
        self._put_warm = client.register_script(_PUT_WARM)
        self._put_final = client.register_script(_PUT_FINAL)

    def record_key(self, tenant: str, request_id: str) -> str:
        rid = hashlib.sha256(request_id.encode()).hexdigest()[:32]
        return f"{self._prefix}:rec:{{{_tenant_tag(tenant)}}}:{rid}"

    def totals_key(self, tenant: str) -> str:
        return f"{self._prefix}:totals:{{{_tenant_tag(tenant)}}}"

    async def get(self, tenant: str, request_id: str, now_ms: int) -> CommitRecord | None:
        found = await self._read(tenant, request_id, now_ms)
        return None if found is None else found.record

    async def _read(self, tenant: str, request_id: str, now_ms: int) -> _Warm | None:
        values = await self._client.hmget(
            self.record_key(tenant, request_id), ["expires_at_ms", "warm", "final"]
        )
        expires, warm, final = cast(list[bytes | None], values)
        if expires is None or warm is None or int(expires) <= now_ms:
            return None
        return _Warm(_record(int(expires), warm, final or b""), warm)

    async def put_warm(
        self, tenant: str, request_id: str, model: str, replica: str, split: Split, now_ms: int
    ) -> CommitRecord:
        warm = json.dumps({"model": model, "replica": replica, "split": asdict(split)})
        found = await self._put_warm(
            keys=[self.record_key(tenant, request_id)],
            args=[now_ms, warm, now_ms + self._ttl_ms, GC_SLACK_MS],
        )
        expires, stood, final = cast(list[bytes], found)
        record = _record(int(expires), stood, final)
        if record.final is None:  # kept for its FINAL
            self._hints.put((tenant, request_id), _Warm(record, stood))
        return record

    async def put_final(
        self, tenant: str, request_id: str, now_ms: int, bill: Bill
    ) -> Placed | None:
        """``CommitLedger.put_final``, priced from this replica's copy of the WARM when it has
        one. Every end of the call drops the copy (billed, repeated, no record, refused, a
        Redis error); copies of WARMs never FINALed here (the record expired, the FINAL sent
        to another replica, a router killed) stay until ``FINAL_HINTS`` pushes them out."""
        key = (tenant, request_id)
        try:
            return await self._place_final(key, now_ms, bill)
        finally:
            self._hints.drop(key)

    async def _place_final(self, key: tuple[str, str], now_ms: int, bill: Bill) -> Placed | None:
        tenant, request_id = key
        warm = self._hints.get(key)
        outcome: Final | Stood | None = None
        if warm is not None:
            try:
                outcome = bill(warm.record)
            except ValueError:  # refused on the copy (BadRequest, BadUsage): priced again
                outcome = None  # from the record that stands, which decides (a FINAL
                # standing there is returned, as before); any other exception is a fault
        if outcome is None:
            warm = await self._read(tenant, request_id, now_ms)
            if warm is None:
                return None
            outcome = bill(warm.record)
        assert warm is not None
        while isinstance(outcome, Final):
            found = await self._put_final_script(tenant, request_id, now_ms, outcome, warm.raw)
            if found[0] == b"other":  # not the WARM priced (a copy gone stale): price that one
                warm = _Warm(_record(int(found[1]), found[2], found[3]), found[2])
                outcome = bill(warm.record)
                continue
            if found[0] == b"missing":
                return None
            stood = Stood(_final(found[1]), repeated=found[0] == b"done")
            return Placed(warm.record, stood, outcome)
        return Placed(warm.record, outcome, None)

    async def _put_final_script(
        self, tenant: str, request_id: str, now_ms: int, final: Final, warm: bytes
    ) -> list[bytes]:
        args: list[Any] = [
            now_ms,
            json.dumps(asdict(final)),
            now_ms + self._ttl_ms,
            GC_SLACK_MS,
            warm,
        ]
        for name, value in increments(final).items():
            args += [name, value]
        return cast(
            list[bytes],
            await self._put_final(
                keys=[self.record_key(tenant, request_id), self.totals_key(tenant)], args=args
            ),
        )

    async def totals(self, tenant: str) -> TenantTotals:
        return _totals(await self._client.hgetall(self.totals_key(tenant)))

    async def totals_of(self, tenants: Sequence[str]) -> list[TenantTotals]:
        """Pipelines of ``HGETALL`` (no transaction: each hash is read as it stands), of
        ``TOTALS_PIPELINE`` tenants each: packing and parsing 1,000 in one held the event
        loop serving Plan and Commit for up to 114 ms (a loaded host, no hiredis); pipelines
        of 100, the loop served between two, for 15-43 ms."""
        found: list[TenantTotals] = []
        for start in range(0, len(tenants), TOTALS_PIPELINE):
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant in tenants[start : start + TOTALS_PIPELINE]:
                    pipe.hgetall(self.totals_key(tenant))
                replies = await pipe.execute()
            found += map(_totals, replies)
        return found


def _totals(raw: object) -> TenantTotals:
    values = {k.decode(): int(v) for k, v in cast(dict[bytes, bytes], raw).items()}
    return TenantTotals(**{k: v for k, v in values.items() if k in _TOTAL_FIELDS})


def _tenant_tag(tenant: str) -> str:
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


def _split(raw: dict[str, Any]) -> Split:
    return Split(
        input_tokens=int(raw["input_tokens"]),
        write_5m_tokens=int(raw["write_5m_tokens"]),
        write_1h_tokens=int(raw["write_1h_tokens"]),
        read_tokens=int(raw["read_tokens"]),
    )


def _charge(raw: dict[str, Any]) -> Charge:
    return Charge(cost_nanos=int(raw["cost_nanos"]), baseline_nanos=int(raw["baseline_nanos"]))


def _final(raw: bytes) -> Final:
    d = json.loads(raw)
    return Final(
        output_tokens=int(d["output_tokens"]),
        kv_cached_tokens=int(d["kv_cached_tokens"]),
        baseline_model=str(d["baseline_model"]),
        charge=_charge(d["charge"]),
        split=_split(d["split"]),
        estimate=_split(d["estimate"]),
        estimate_charge=_charge(d["estimate_charge"]),
        reconciled=bool(d["reconciled"]),
    )


def _record(expires_at_ms: int, warm: bytes, final: bytes) -> CommitRecord:
    w = json.loads(warm)
    return CommitRecord(
        model=str(w["model"]),
        replica=str(w["replica"]),
        split=_split(w["split"]),
        expires_at_ms=expires_at_ms,
        final=_final(final) if final else None,
    )
