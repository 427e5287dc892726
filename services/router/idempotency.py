"""Answer-once for retries: a request_id seen before gets the first answer back.

The first call with an id runs; concurrent and later calls with the same (tenant, id) await
its outcome. A failed first call releases the id so a retry runs again (the prefix-cache
commit is idempotent by id too, so nothing is billed twice). Records live for a TTL read
from the injected clock and the table is bounded as answers are kept, by count and by the
answers' serialized bytes (a record holds its whole answer: 100,000 4k-token answers were
2.2 GiB). Over a bound, the tenant holding the most answers (by that bound: count or bytes)
loses its oldest answered record, so one tenant's flood pushes out its own answers, not
another tenant's (whose unmarked retry would then run the model and be billed again); never
one whose call still runs (a retry of it must await it, not run the model again; those are
bounded by the calls in flight).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import Clock, MonotonicClock
from services.common.holdings import Holdings


class IdempotencyConflict(Exception):
    """The request_id was used before for a different request."""


DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # ROUTER_IDEMPOTENCY_MAX_BYTES


@dataclass
class _Record:
    fingerprint: str
    future: asyncio.Future[pb.CompleteResponse]
    created_ms: int
    size: int = -1  # its answer's serialized bytes once kept (``kept``); -1: not kept


def conflict(request_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"request_id: {request_id[:64]!r} was already used for a different request; use a new "
        "request_id for a new request"
    )


def fingerprint(request: pb.CompleteRequest) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class IdempotencyTable:
    @classmethod
    def in_process(
        cls, ttl_s: float, max_records: int, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> IdempotencyTable:
        """The router's table: its records live in this process only, so their TTL is an age
        on a ``MonotonicClock``. On the wall clock a step forward of a day (NTP, a VM resumed)
        expired every answer at once, and a retry seconds later ran the model again."""
        return cls(MonotonicClock(), ttl_s, max_records, max_bytes)

    def __init__(
        self, clock: Clock, ttl_s: float, max_records: int, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        """``max_records``, ``max_bytes``: the answers kept, by count and by the sum of their
        serialized sizes (``ByteSize``)."""
        self._clock = clock
        self._ttl_ms = int(ttl_s * 1000)
        self._max = max_records
        self._max_bytes = max_bytes
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        self._answered = 0  # records whose answer was kept (``kept``); the bounds count these
        self.held_bytes = 0  # the kept answers' serialized bytes
        # each tenant's answered request ids, oldest kept first, and what each tenant holds
        self._kept: dict[str, OrderedDict[str, None]] = {}
        self._counts = Holdings()
        self._bytes = Holdings()

    def claim(
        self, tenant: str, request: pb.CompleteRequest, mark: str | None = None
    ) -> tuple[bool, asyncio.Future[pb.CompleteResponse]]:
        """(True, future) when this call must run and resolve the future; (False, f) to await.
        ``mark``: the request's ``fingerprint`` when the caller has it already."""
        self._expire()
        key = (tenant, request.request_id)
        mark = mark if mark is not None else fingerprint(request)
        record = self._records.get(key)
        if record is not None:
            if record.fingerprint != mark:
                raise conflict(request.request_id)
            return False, record.future
        future: asyncio.Future[pb.CompleteResponse] = asyncio.get_running_loop().create_future()
        self._records[key] = _Record(mark, future, self._clock.now_ms())
        return True, future

    def release(
        self, tenant: str, request_id: str, future: asyncio.Future[pb.CompleteResponse]
    ) -> None:
        """Forgets a failed first call so that a retry runs again (only its own record: a
        later call's under the same id is left alone)."""
        record = self._records.get((tenant, request_id))
        if record is not None and record.future is future:
            self._drop((tenant, request_id))

    def __len__(self) -> int:
        return len(self._records)

    def kept(self, tenant: str, request_id: str) -> None:
        """The answer of (tenant, request_id) was kept (its future resolved): the answered
        records are bounded. Calls still running never count (nor are dropped), so refused or
        failing calls, however many, never push an answer out."""
        record = self._records.get((tenant, request_id))
        if record is None or record.size >= 0 or not record.future.done():
            return
        if record.future.cancelled() or record.future.exception() is not None:
            return
        record.size = record.future.result().ByteSize()
        self._answered += 1
        self.held_bytes += record.size
        self._kept.setdefault(tenant, OrderedDict())[request_id] = None
        self._counts.add(tenant, 1)
        self._bytes.add(tenant, record.size)
        while self._answered > self._max or self.held_bytes > self._max_bytes:
            most = self._counts if self._answered > self._max else self._bytes
            holder = most.most()  # its oldest answer goes, another tenant's stay
            self._drop((holder, next(iter(self._kept[holder]))))

    def _drop(self, key: tuple[str, str]) -> None:
        record = self._records.pop(key)
        if record.size >= 0:
            self._answered -= 1
            self.held_bytes -= record.size
            tenant, request_id = key
            kept = self._kept[tenant]
            del kept[request_id]
            if not kept:
                del self._kept[tenant]
            self._counts.add(tenant, -1)
            self._bytes.add(tenant, -record.size)

    def _expire(self) -> None:
        """Drops the answered records past their TTL (oldest first); a call still running is
        stepped over, not waited for (it would keep every later answer alive)."""
        cutoff = self._clock.now_ms() - self._ttl_ms
        expired: list[tuple[str, str]] = []
        for key, record in self._records.items():
            if record.created_ms > cutoff:
                break
            if record.future.done():
                expired.append(key)
        for key in expired:
            self._drop(key)
