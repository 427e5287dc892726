"""Answer-once for retries: a request_id seen before gets the first answer back.

The first call with an id runs; concurrent and later calls with the same (tenant, id) await
its outcome. A failed first call releases the id so a retry runs again (the prefix-cache
commit is idempotent by id too, so nothing is billed twice). Records live for a TTL read
from the injected clock and the table is bounded as answers are kept: the oldest answered
record is dropped first, never one whose call still runs (a retry of it must await it, not
run the model again; those are bounded by the calls in flight).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import Clock


class IdempotencyConflict(Exception):
    """The request_id was used before for a different request."""


@dataclass
class _Record:
    fingerprint: str
    future: asyncio.Future[pb.CompleteResponse]
    created_ms: int


def conflict(request_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"request_id: {request_id[:64]!r} was already used for a different request; use a new "
        "request_id for a new request"
    )


def fingerprint(request: pb.CompleteRequest) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class IdempotencyTable:
    def __init__(self, clock: Clock, ttl_s: float, max_records: int) -> None:
        self._clock = clock
        self._ttl_ms = int(ttl_s * 1000)
        self._max = max_records
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        self._answered = 0  # records whose answer was kept (``kept``); the bound counts these

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
            del self._records[(tenant, request_id)]

    def __len__(self) -> int:
        return len(self._records)

    def kept(self) -> None:
        """An answer was kept (its future resolved): the answered records are bounded. Calls
        still running never count (nor are dropped), so refused or failing calls, however
        many, never push an answer out."""
        self._answered += 1
        excess = self._answered - self._max
        if excess <= 0:
            return
        done: list[tuple[str, str]] = []
        for key, record in self._records.items():  # oldest first; stops at the excess
            if record.future.done():
                done.append(key)
                if len(done) == excess:
                    break
        for key in done:
            del self._records[key]
        self._answered -= len(done)

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
            del self._records[key]
        self._answered -= len(expired)
