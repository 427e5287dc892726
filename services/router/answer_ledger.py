"""Answer-once across router restarts: a billed answer recorded by (tenant, request_id).

The in-process table (``idempotency.py``) answers a retry that reaches the same router. A
router that dies after the model answered and the bill was committed, but before its reply
left, would let the client's retry (gRPC's retry policy resends the same request_id) call the
model and bill again on the restarted router or another one. With ``ROUTER_ANSWERS_REDIS_URL``
set, each answer the model served is recorded in Redis before it goes out (for the idempotency
TTL), and a retry that the table does not know — one carrying gRPC's
``grpc-previous-rpc-attempts`` header — gets that recorded answer instead of a second call.

Keys are a hash of the tenant and the request id (no caller text in Redis's key space); the
value is the request's fingerprint and the serialized answer. A Redis that fails is logged and
the answer still goes out: the request is served once, only its retry protection is lost.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachemesh.v1 import gateway_pb2 as pb

_PREFIX = b"cachemesh:answer:"
_FINGERPRINT_BYTES = 64  # sha256 hex of the request (idempotency.fingerprint)


class LedgerUnavailable(Exception):
    """The ledger could not be read or written (its message names why, never a secret)."""


class AnswerLedger(Protocol):
    async def recall(self, tenant: str, request_id: str) -> tuple[str, pb.CompleteResponse] | None:
        """(the request's fingerprint, its answer) when one was recorded."""
        ...

    async def record(
        self, tenant: str, request_id: str, fingerprint: str, answer: pb.CompleteResponse
    ) -> None: ...

    async def close(self) -> None: ...


def ledger_key(tenant: str, request_id: str) -> bytes:
    digest = hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()
    return _PREFIX + digest.encode()


class RedisAnswerLedger:
    def __init__(self, redis: Redis, ttl_s: float) -> None:
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def recall(self, tenant: str, request_id: str) -> tuple[str, pb.CompleteResponse] | None:
        try:
            raw = await self._redis.get(ledger_key(tenant, request_id))
        except RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(raw, bytes):  # None: nothing recorded (the client returns bytes)
            return None
        answer = pb.CompleteResponse()
        answer.ParseFromString(raw[_FINGERPRINT_BYTES:])
        return raw[:_FINGERPRINT_BYTES].decode(), answer

    async def record(
        self, tenant: str, request_id: str, fingerprint: str, answer: pb.CompleteResponse
    ) -> None:
        value = fingerprint.encode() + answer.SerializeToString()
        # NX: the first answer stays the answer, whatever a racing attempt recorded later
        try:
            await self._redis.set(ledger_key(tenant, request_id), value, px=self._ttl_ms, nx=True)
        except RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()
