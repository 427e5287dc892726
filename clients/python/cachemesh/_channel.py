"""How the clients reach the Gateway: retries of UNAVAILABLE (and of the CANCELLED a stopping
router sends a call arriving as it stops) by gRPC's own retry policy, and
reconnects quick once the Gateway is back.

gRPC retries a call only while it is uncommitted: before the Gateway has sent anything back
(a unary ``Complete``: until its answer; ``StreamComplete``: until its first chunk), so a retry
never repeats part of an answer. Every call carries a ``request_id`` (the client makes one when
the request has none), and a retry resends the same bytes, so the Gateway answers a retried
request once and bills it once (its answer-once table, by ``request_id``). A call that failed
after a model call of it was billed (cut mid-answer on every replica it was handed to) made no
answer: a retry would be a new model call, billed again, so the Gateway ends it with gRPC's
server pushback trailer ``grpc-retry-pushback-ms: -1`` and gRPC does not retry it.

A request that comes with its own ``request_id`` may be the caller's own retry (the id an error
named), which can reach another router or a restarted one: such a call carries the retry mark
(``cachemesh-retry: 1``), so the router looks the id up in the answer ledger the routers share
(one Redis read; an id it has never seen is served as a first call) and answers it from there.
"""

from __future__ import annotations

import json
import math
import numbers
import uuid

import grpc

from cachemesh.v1 import gateway_pb2 as pb

GATEWAY_SERVICE = "cachemesh.v1.Gateway"
MAX_ATTEMPTS = 5  # gRPC's ceiling
# Retries wait a random time up to 0.25, 0.5, 1, 2 s (the attempt's ceiling doubling), and
# with wait_for_ready each attempt waits for the channel to be ready again (within the call's
# timeout): a Gateway that restarts within a few seconds answers the retry. The clients wait
# so only once the Gateway has answered on the channel (``Reached``).
RETRY_POLICY = {
    "maxAttempts": MAX_ATTEMPTS,
    "initialBackoff": "0.25s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    # CANCELLED from the Gateway (not the caller's own cancel, which gRPC never retries): a
    # router stopping cut the call as it arrived, before it was served
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
DEFAULT_TIMEOUT_S = 120.0  # a call's deadline unless the client or the call names one
# a day: anything longer is a typo. gRPC takes 0, a negative, nan, inf or more than ~9.2e9 s
# as a deadline passed already: the call failed at once as DEADLINE_EXCEEDED, nothing sent
TIMEOUT_MAX_S = 86_400.0
MAX_REQUEST_BYTES = 2 << 20  # the Gateway's default ROUTER_MAX_REQUEST_BYTES
RETRY_MARK = ("cachemesh-retry", "1")  # the router's RETRY_HEADERS: read the answer ledger
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def deadline_s(value: float, parameter: str = "timeout_s") -> float:
    """``value``, a deadline in seconds (any real number: an int, a float, a numpy float; not
    a bool), when it is over 0 and at most ``TIMEOUT_MAX_S``; else a ValueError naming
    ``parameter``, before anything is sent (gRPC failed such a call at once with
    DEADLINE_EXCEEDED, a ``DeadlineExceededError`` saying the call was billed)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    seconds = float(value) if real else math.nan
    if not 0 < seconds <= TIMEOUT_MAX_S:  # nan and inf fail too
        raise ValueError(
            f"{parameter} must be a number of seconds over 0, at most {TIMEOUT_MAX_S:,.0f}, "
            f"got {value!r}"
        )
    return seconds


def default_deadline_s(value: float | None) -> float | None:
    """A client's ``timeout_s``: ``deadline_s``'s, or None, no deadline (a call waits as long
    as the Gateway takes, bounded by the router's own ``ROUTER_MODEL_TIMEOUT_S``)."""
    if value is None:
        return None
    try:
        return deadline_s(value)
    except ValueError as error:
        raise ValueError(f"{error} (None: no deadline)") from None


def service_config(wait_for_ready: bool, max_attempts: int = MAX_ATTEMPTS) -> str:
    """``max_attempts`` 1: no retry (the first UNAVAILABLE is the caller's to see)."""
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be 1 to {MAX_ATTEMPTS}, got {max_attempts}")
    method: dict[str, object] = {
        "name": [{"service": GATEWAY_SERVICE}],
        "waitForReady": wait_for_ready,
    }
    if max_attempts > 1:
        method["retryPolicy"] = {**RETRY_POLICY, "maxAttempts": max_attempts}
    return json.dumps({"methodConfig": [method]})


def channel_options(
    wait_for_ready: bool = True, max_attempts: int = MAX_ATTEMPTS
) -> list[tuple[str, int | str]]:
    """Options for a channel to the Gateway (pass them when you make your own, e.g. TLS)."""
    return [
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.service_config", service_config(wait_for_ready, max_attempts)),
        # a retry resends the request from this buffer: room for the largest request
        ("grpc.per_rpc_retry_buffer_size", 2 * MAX_REQUEST_BYTES),
        ("grpc.retry_buffer_size", 16 * MAX_REQUEST_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # a dead Gateway (or path to it) is noticed within 40 s of silence on a call: pings
        # every 30 s (the Gateway accepts one every 5 s), also on a stream quiet for long (a
        # model still thinking), each answered within 10 s (gRPC waits a minute unless told)
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# what gRPC says of a call the Gateway may never have seen (no connection, or cut by a deadline)
NOT_REACHED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


class Reached:
    """Whether the Gateway has answered on a client's channel (an answer, a chunk, or a status
    of its own), so its address and TLS settings work. Until then a call does not wait for the
    channel to be ready: a wrong CA, plaintext to a TLS Gateway (or TLS to a plaintext one) or
    a refused connect fails with gRPC's reason (``Tls handshake failed ...``) once the retry
    policy's attempts are spent (``RETRY_POLICY``: about 4 s, so a Gateway still starting is
    given that long), not a bare DEADLINE_EXCEEDED after the whole timeout. From then on a
    call waits, within its timeout, for a Gateway that restarts (``wait_for_ready``)."""

    def __init__(self, wait_for_ready: bool) -> None:
        self._wait_for_ready = wait_for_ready
        self._reached = False

    def wait_for_ready(self) -> bool:
        """The ``wait_for_ready`` of the next call (gRPC's per call, over the service config)."""
        return self._wait_for_ready and self._reached

    def answered(self) -> None:
        self._reached = True

    def failed(self, error: grpc.RpcError) -> None:
        """A status gRPC makes without the Gateway (NOT_REACHED) says nothing of it."""
        code = error.code() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
        if code is not None and code not in NOT_REACHED:
            self._reached = True


def with_request_id(request: pb.CompleteRequest) -> pb.CompleteRequest:
    """``request`` itself when it has a ``request_id``, else a copy with a new one; anything
    but a ``CompleteRequest`` is a TypeError saying how to make one (it was an AttributeError,
    "'str' object has no attribute 'request_id'", or gRPC's serializer's TypeError)."""
    if not isinstance(request, pb.CompleteRequest):
        raise TypeError(
            "request must be a cachemesh.v1 CompleteRequest (cachemesh.build_request(...) "
            f"makes one; client.ask(question) asks a question), got {type(request).__name__}"
        )
    if request.request_id:
        return request
    copy = pb.CompleteRequest()
    copy.CopyFrom(request)
    copy.request_id = uuid.uuid4().hex
    return copy


def call_metadata(
    base: tuple[tuple[str, str], ...], request: pb.CompleteRequest
) -> tuple[tuple[str, str], ...]:
    """``base`` plus the retry mark when the caller gave ``request`` its ``request_id`` (it may
    be a retry of an answered call); an id the client makes is new, never marked."""
    return (*base, RETRY_MARK) if request.request_id else base


# gRPC's own words for an attempt no connection was made for (an earlier attempt of the call,
# retried by gRPC, may have reached the Gateway before it went away)
NOT_CONNECTED = (
    "failed to connect to all addresses",
    "DNS resolution failed",  # a name that does not resolve, in older gRPC's words
    "errors resolving ",  # the same in gRPC 1.85's ("errors resolving host:port: [...]")
    "Connection refused",
)


def never_connected(code: grpc.StatusCode, message: str) -> bool:
    """Whether an UNAVAILABLE is gRPC's own for a Gateway its last attempt could not connect
    to (a refused port, a name that does not resolve, a failed TLS handshake), not a Gateway's
    answer."""
    return code is grpc.StatusCode.UNAVAILABLE and any(s in message for s in NOT_CONNECTED)
