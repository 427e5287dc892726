"""Answer-once across routers and restarts: a billed answer recorded by (tenant, request_id),
and a claim on the id while its call's model call runs.

The in-process table (``idempotency.py``) answers a retry that reaches the same router. A
retry that reaches another router (gRPC's retry policy resends the same request_id; a caller
that resends it marks it ``cachemesh-retry: 1``, or sends it unmarked, as grpcurl does) must
neither call the model nor bill again:

- A marked call (one that may be a retry) claims its id in Redis before anything else, and an
  unmarked call with its own request_id once L1 did not answer it, just before its model call
  (an L1 hit makes no Redis round trip): one script that either takes the claim (``SET NX``
  with a lease, renewed every third of it while the call runs) or returns what holds the id,
  a recorded answer (served instead of a second call) or another router's live claim (the
  call waits, polling, within its own deadline, for that call's answer; when the claim goes,
  given back by a call that failed or lapsed with a router that died, it takes the claim and
  calls the model itself).
- Each answer the model served is recorded before it goes out (for the idempotency TTL), over
  a claim (its own, or one that lapsed and was taken since: the first answer recorded stays),
  when its request came with its own request_id: an id the router made up for a request sent
  without one no caller can retry with, so such a request is neither claimed nor recorded.

Keys are a hash of the tenant and the request id (no caller text in Redis's key space); an
answer's value is the request's fingerprint, a NUL and the serialized answer compressed with
zlib (each answer lives in Redis for the idempotency TTL, 24 h by default: see the README's
sizing); a value written before without the NUL (no serialized answer starts with one: field 0
does not exist) is the serialized answer itself, still read. A claim's value is ``?``, the
fingerprint and its holder's token. A Redis that fails is logged and the request still goes
on: it is served (once on this router), only its protection across routers is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from google.protobuf.message import DecodeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachemesh.v1 import gateway_pb2 as pb
from services.common.background import unless_cancelled
from services.router.renewals import Renewals

log = logging.getLogger(__name__)

_PREFIX = b"cachemesh:answer:"
_FINGERPRINT_BYTES = 64  # sha256 hex of the request (idempotency.fingerprint)
_CLAIM = b"?"  # a claim's first byte (an answer's is the fingerprint's, a hex digit)
_COMPRESSED = b"\0"  # after an answer's fingerprint: the rest is zlib of the serialized answer
CLAIM_LEASE_S = 10.0  # a claim lapses this long after its holder last renewed it
# A claim is renewed on ``Renewals``' schedule, then given up: a renewal after the lapse could
# only find it gone (``_RENEW`` renews only a claim that is still there and still this call's).
# What a failure is counted under (``cachemesh_router_answer_ledger_failures_total``): the
# claim before a call's model call, each try of its renewal, the answer's record, and
# the claim given back after a call that recorded nothing.
LedgerOperation = Literal["claim", "renew", "record", "give_back"]
LEDGER_OPERATIONS: tuple[LedgerOperation, ...] = get_args(LedgerOperation)

# KEYS: the id's key. ARGV: the claim, its lease in ms. Returns 1 (claimed) or what holds it.
_TAKE = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the id's key. ARGV: the claim, its lease in ms. 1 = renewed (still ours).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: the id's key. ARGV: the answer, its TTL in ms. Over no record or a claim: the first
# answer stays the answer, whatever a racing attempt recorded later.
_RECORD = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 1) ~= '?' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class LedgerUnavailable(Exception):
    """The ledger could not be read or written (its message names why, never a secret).
    ``redis_failed``: Redis failed (not one record that does not read): it counts toward
    leaving Redis alone (``breaker.Breaker``)."""

    def __init__(self, message: str, *, redis_failed: bool = True) -> None:
        super().__init__(message)
        self.redis_failed = redis_failed


@dataclass(frozen=True)
class Claimed:
    """This call holds the id: it makes the model call (``value``: the claim in Redis)."""

    value: bytes


@dataclass(frozen=True)
class Running:
    """Another call holds a live claim on the id (for the request with ``fingerprint``)."""

    fingerprint: str


@dataclass(frozen=True)
class Recorded:
    fingerprint: str
    answer: pb.CompleteResponse


def new_claim(fingerprint: str) -> Claimed:
    """A claim on an id for one call (``fingerprint``: its request's), not yet taken: its
    value is unique to the call, so the call can give it back (``give_back`` deletes only a
    claim that is still this value) even when the reply of the ``claim`` that took it never
    reached it (its caller's cancel cut it)."""
    return Claimed(_CLAIM + fingerprint.encode() + uuid.uuid4().hex.encode())


class AnswerLedger(Protocol):
    async def claim(
        self, tenant: str, request_id: str, fingerprint: str, mine: Claimed | None = None
    ) -> Claimed | Running | Recorded:
        """Takes the id for this call (as ``mine``, from ``new_claim(fingerprint)``; None: a
        new one), or says what holds it."""
        ...

    async def hold(self, tenant: str, request_id: str, claimed: Claimed) -> None:
        """Renews the claim until cancelled, or until its renewals failed up to shortly before
        it lapses (its failures logged, never raised)."""
        ...

    async def give_back(self, tenant: str, request_id: str, claimed: Claimed) -> None: ...

    async def record(
        self, tenant: str, request_id: str, fingerprint: str, answer: pb.CompleteResponse
    ) -> None: ...

    async def close(self) -> None: ...


def ledger_key(tenant: str, request_id: str) -> bytes:
    digest = hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()
    return _PREFIX + digest.encode()


class RedisAnswerLedger:
    def __init__(
        self,
        redis: Redis,
        ttl_s: float,
        lease_s: float = CLAIM_LEASE_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        failed: Callable[[LedgerOperation], None] = lambda operation: None,
    ) -> None:
        """``lease_s``: a claim's life without renewal; ``sleep``: between renewals, and
        ``clock`` (seconds) to tell when the last one succeeded (tests); ``failed``: told of
        each renewal try that failed (the other operations raise ``LedgerUnavailable``: their
        caller, which also bounds their time, counts them)."""
        self._failed = failed
        self._clock = clock
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._lease_s = lease_s
        self._lease_ms = max(1, int(lease_s * 1000))
        self._sleep = sleep
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._record = redis.register_script(_RECORD)

    async def claim(
        self, tenant: str, request_id: str, fingerprint: str, mine: Claimed | None = None
    ) -> Claimed | Running | Recorded:
        mine = mine if mine is not None else new_claim(fingerprint)
        try:
            held = await self._take(
                keys=[ledger_key(tenant, request_id)], args=[mine.value, self._lease_ms]
            )
        except RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(held, bytes):  # 1: taken
            return mine
        if held.startswith(_CLAIM):
            return Running(held[1 : 1 + _FINGERPRINT_BYTES].decode())
        try:
            answer = _answer(held[_FINGERPRINT_BYTES:])
        except (zlib.error, DecodeError) as exc:  # e.g. a format a later version wrote
            raise LedgerUnavailable(
                f"a recorded answer does not read ({exc})", redis_failed=False
            ) from None
        return Recorded(held[:_FINGERPRINT_BYTES].decode(), answer)

    async def hold(self, tenant: str, request_id: str, claimed: Claimed) -> None:
        """Renews on ``Renewals``' schedule (each try bounded by the wait before it, and by no
        less than its retry share, nor more than the normal wait), then gives up: the claim
        lapses and a retry on another router may take the id. Of a claim's failures only its
        first and the give-up are logged."""
        key = ledger_key(tenant, request_id)
        schedule = Renewals(self._lease_s, self._clock)  # the claim, just taken
        while True:
            await self._sleep(schedule.wait_s)
            tried = self._clock()  # a lease counts from a try's start
            timeout_s = min(schedule.normal_s, max(schedule.wait_s, schedule.least_s))
            try:
                async with asyncio.timeout(timeout_s):
                    # its call's end cancels it: a cancel lost under the renewal (redis-py's
                    # ``wait_for``, ``services.common.background``) ends it here, or it went on
                    # renewing the claim for as long as it was there
                    ours = await unless_cancelled(
                        self._renew(keys=[key], args=[claimed.value, self._lease_ms])
                    )
            except (RedisError, TimeoutError) as exc:
                self._failed("renew")
                again = schedule.failed()
                if schedule.failures == 1:
                    log.warning(
                        "answer ledger: renewing the claim of tenant %s's request %s failed "
                        "(%s); tried again, less and less often, until shortly before it lapses",
                        tenant,
                        request_id,
                        type(exc).__name__,
                    )
                if not again:
                    log.warning(
                        "answer ledger: the claim of tenant %s's request %s went %.1f s without "
                        "a renewal (%d tries failed, the last %s), its %.1f s lease nearly "
                        "over: not renewed any more; once it lapses a retry on another router "
                        "may take the id over and call the model again",
                        tenant,
                        request_id,
                        schedule.since_renewed_s(),
                        schedule.failures,
                        type(exc).__name__,
                        self._lease_s,
                    )
                    return
                continue
            if not ours:  # recorded over, given back, or lapsed and taken: nothing to keep
                return
            schedule.renewed(tried)

    async def give_back(self, tenant: str, request_id: str, claimed: Claimed) -> None:
        try:
            await self._give_back(keys=[ledger_key(tenant, request_id)], args=[claimed.value])
        except RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def record(
        self, tenant: str, request_id: str, fingerprint: str, answer: pb.CompleteResponse
    ) -> None:
        value = fingerprint.encode() + _COMPRESSED + zlib.compress(answer.SerializeToString())
        try:
            await self._record(keys=[ledger_key(tenant, request_id)], args=[value, self._ttl_ms])
        except RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()


def is_ledger_key(key: bytes) -> bool:
    return key.startswith(_PREFIX)


def stored_answer(value: bytes) -> pb.CompleteResponse | None:
    """The answer a ledger value records, read as ``take`` reads it (None: a claim, no answer
    yet); for a reader of what Redis keeps (the no-secrets sweep), as an answer is stored
    zlib-compressed. Raises ``zlib.error`` / ``DecodeError`` if it does not read."""
    if value.startswith(_CLAIM):
        return None
    return _answer(value[_FINGERPRINT_BYTES:])


def _answer(stored: bytes) -> pb.CompleteResponse:
    """A recorded answer from its stored bytes: compressed, or as written before (serialized)."""
    if stored.startswith(_COMPRESSED):
        stored = zlib.decompress(stored[len(_COMPRESSED) :])
    answer = pb.CompleteResponse()
    answer.ParseFromString(stored)
    return answer
