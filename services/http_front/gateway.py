"""The front's client of ``cachemesh.v1.Gateway``: the caller's own key passed through as
``authorization: Bearer`` metadata with the front's span as ``traceparent`` (the router's
server span joins the caller's trace), gRPC failures turned into ``ApiError``s.

The trace context is put in the metadata here rather than by OpenTelemetry's gRPC client
interceptor: py-spy showed the interceptor at about a tenth of the front's CPU on an exact
hit, for a client span that would only repeat the front's server span."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachemesh.retry_info import (
    UNBILLED_FINAL,
    error_reason,
    made_request_id,
    no_retry,
    retry_delay_s,
)
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.channels import channel_options
from services.common.clock import Clock, MonotonicClock, Throttle
from services.common.errors import Code
from services.common.server import MAX_MESSAGE_BYTES_DEFAULT
from services.common.status import code_of
from services.common.tls import ClientTls
from services.http_front.errors import ApiError, from_gateway

log = logging.getLogger("cachemesh.http_front")

RETRY_AFTER = "retry-after"
# What a caller is told when no Gateway answered at all (the channel's own UNAVAILABLE: refused,
# reset, TLS or name failures): gRPC's text names the Gateway's internal address, so it goes
# to the log only.
UNREACHABLE = "the Gateway is unreachable; retry"
# What a caller is told when its stream had begun and the connection to the Gateway then closed
# (a router stopping cuts the streams still running at the end of its grace): the Gateway was
# reached, and the answer is not whole.
BROKE_OFF = (
    "the connection to the Gateway closed mid-answer (the router stopped or restarted); the "
    "answer is incomplete; retry"
)
# The router reads its answer ledger (another router's answers) only for calls so marked; a
# first call so marked is served as usual, after that one read.
RETRY_MARK = ("cachemesh-retry", "1")
# With the router down every request fails alike: its warning is logged at most once in this
# many milliseconds, with the count of those left out since the last one.
UNREACHABLE_LOG_EVERY_MS = 10_000


def api_error(error: grpc.aio.AioRpcError) -> ApiError:
    """The Gateway's refusal as the HTTP APIs report it; the wait of a rate limit or budget is
    the RetryInfo delay in the status details (rounded up to whole seconds), else its
    ``retry-after`` trailer; why a RESOURCE_EXHAUSTED is refused, its ErrorInfo reason (a rate,
    a budget, a request too large). A refusal with a negative server pushback (a model call of
    it was billed without its answer) is ``billed``: final, whatever its status; one whose
    ErrorInfo says ``UPSTREAM_RETRIED`` (its providers retried already, not billed) is final
    too, without the billed words (``errors.from_gateway``); one that says
    ``UPSTREAM_RATE_LIMITED`` (its providers' wait outlasted the client's deadline, not
    billed) is a rate-limited refusal with its retry-after, as before that reason."""
    trailers = error.trailing_metadata() or ()
    retry_after: int | None = None
    delay = retry_delay_s(trailers)
    if delay is not None:
        retry_after = max(1, math.ceil(delay))
    else:
        for key, value in trailers:
            if key == RETRY_AFTER:
                text = value.decode() if isinstance(value, bytes) else value
                retry_after = int(text) if text.isascii() and text.isdigit() else 1
    reason = error_reason(trailers)
    refusal = from_gateway(
        code_of(error.code()),
        error.details() or "",
        retry_after,
        billed=no_retry(trailers) and reason not in UNBILLED_FINAL,
        reason=reason,
    )
    return replace(refusal, request_id=made_request_id(trailers))


def _metadata(
    request: pb.CompleteRequest, key: str, traceparent: str
) -> tuple[tuple[str, str], ...]:
    """The caller's key, the trace and, for a request the caller gave an id (its
    ``Idempotency-Key``), the retry mark: the front cannot tell a first call from a retry that
    reached it from another front or after a router restart, and only a marked call is
    answered from the answer another router recorded for that id (billed once)."""
    metadata = [("authorization", f"Bearer {key}")]
    if traceparent:
        metadata.append(("traceparent", traceparent))
    if request.request_id:
        metadata.append(RETRY_MARK)
    return tuple(metadata)


class Gateway:
    def __init__(
        self,
        address: str,
        timeout_s: float,
        tls: ClientTls | None = None,
        clock: Clock | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES_DEFAULT,  # CACHEMESH_MAX_MESSAGE_BYTES
    ) -> None:
        options = channel_options(max_message_bytes)
        self._channel = (
            grpc.aio.insecure_channel(address, options=options)
            if tls is None
            else grpc.aio.secure_channel(address, tls.grpc_credentials(), options=options)
        )
        self._address = address
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)
        self._timeout_s = timeout_s
        # the interval of its log line is this process's own: a wall clock stepped back
        # (NTP) silenced it for the step's length
        self._unreachable = Throttle(
            clock if clock is not None else MonotonicClock(), UNREACHABLE_LOG_EVERY_MS
        )

    async def complete(
        self,
        request: pb.CompleteRequest,
        key: str,
        traceparent: str,
        reached: Callable[[], None] | None = None,
    ) -> pb.CompleteResponse:
        """The Gateway's answer; ``reached`` is called once the Gateway showed it has the call:
        its answer came, or a status it sent (``_failure``). Nothing else shows it: the router
        sends no initial metadata before its answer or first message (a header from the
        server commits a gRPC call, and a client's retry of the router's UNAVAILABLE would
        not be made), so the front waits on none. From then on the router writes the call's
        access line; a caller gone before it has the front's line too (``handlers.Front``:
        a cancel that beat the call to the router, or one while the router had sent nothing
        yet, which then has both lines)."""
        call = self._stub.Complete(
            request, metadata=_metadata(request, key, traceparent), timeout=self._timeout_s
        )
        try:
            response: pb.CompleteResponse = await call
            if reached is not None:
                reached()
        except grpc.aio.AioRpcError as error:
            raise self._failure(error, reached=reached) from None
        except asyncio.CancelledError:
            call.cancel()  # the HTTP caller went away: so does the Gateway call
            raise
        return response

    async def stream(
        self,
        request: pb.CompleteRequest,
        key: str,
        traceparent: str,
        reached: Callable[[], None] | None = None,
    ) -> AsyncGenerator[pb.CompleteChunk, None]:
        """The Gateway's chunks; ``reached`` as for ``complete``: at its first message, or a
        status it sent."""
        call = self._stub.StreamComplete(
            request, metadata=_metadata(request, key, traceparent), timeout=self._timeout_s
        )
        began = False
        try:
            async for chunk in call:
                if not began and reached is not None:
                    reached()
                began = True
                yield chunk
        except grpc.aio.AioRpcError as error:
            raise self._failure(error, began, reached) from None
        finally:
            call.cancel()  # a no-op once the call has ended; else the caller went away

    def _failure(
        self,
        error: grpc.aio.AioRpcError,
        began: bool = False,
        reached: Callable[[], None] | None = None,
    ) -> ApiError:
        """The refusal the caller gets: the Gateway's own status as it sent it; an
        ``UNAVAILABLE`` the channel raised itself (the channel is not connected) as the fixed
        ``UNREACHABLE`` when no Gateway answered, ``BROKE_OFF`` when the stream had ``began``,
        gRPC's detail logged. Any status but ``UNREACHABLE`` counts as the Gateway's
        (``reached``): it ended a call it had (a deadline the channel ran out on a connected
        Gateway too: the router ends its call by the same deadline, and logs it)."""
        if error.code() == grpc.StatusCode.UNAVAILABLE and not self._connected():
            if began:
                log.warning("a Gateway stream broke off: %s", error.details() or "")
                return from_gateway(Code.UNAVAILABLE, BROKE_OFF)
            self._log_unreachable(error.details() or "")
            return from_gateway(Code.UNAVAILABLE, UNREACHABLE)
        if reached is not None:
            reached()
        if began and error.code() == grpc.StatusCode.CANCELLED:  # a stopping router's cut
            billed = no_retry(error.trailing_metadata() or ())
            return from_gateway(Code.UNAVAILABLE, BROKE_OFF, billed=billed)
        return api_error(error)

    def _log_unreachable(self, detail: str) -> None:
        """One warning per ``UNREACHABLE_LOG_EVERY_MS`` while the Gateway is down, not one
        per request (a flood of identical lines at the front's request rate)."""
        failed = self._unreachable.due()
        if not failed:
            return
        more = (
            f" ({failed - 1} more requests failed so since the last warning)" if failed > 1 else ""
        )
        log.warning("the Gateway at %s is unreachable: %s%s", self._address, detail, more)

    def _connected(self) -> bool:
        """A status the Gateway sent leaves the channel READY; one the channel raised (refused,
        reset, a failed TLS handshake) leaves it connecting or failed."""
        state = self._channel.get_state(try_to_connect=False)
        return bool(state == grpc.ChannelConnectivity.READY)

    async def serving(self, timeout_s: float = 1.0) -> bool:
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()
