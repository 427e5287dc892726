"""Malformed messages are the caller's fault: INVALID_ARGUMENT with a short reason, no traceback.

gRPC parses a request before any servicer runs; a parser that raises makes grpc log the
traceback at ERROR and answer UNKNOWN with the exception's name, for any caller, with or
without a key (a log flood, and a status that does not tell the caller what is wrong). Every
handler's parser is wrapped here instead: a message that does not parse (corrupt wire format,
invalid UTF-8 in a string field, nesting past protobuf's recursion limit) reaches the handler
as ``Malformed``, which the wrapper refuses before the servicer, or its authentication, sees it.
The same wrapper is the last resort for an exception no servicer mapped to a status: INTERNAL
with the exception's type, never grpc's UNKNOWN with its text. A service that counts its
refusals (the router: its metrics and access log live in its servicer) is told of each
malformed request it refused (``refused``, with the method's full name).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.aborts import call_over, raised_by_grpc
from services.common.handler_memo import HandlerMemo

Handler = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]

log = logging.getLogger("cachemesh.wire")

_REASON_CHARS = 120  # the parser's own words, bounded (they never quote the caller's bytes)


class Malformed:
    """A request that did not parse, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``parse``, returning ``Malformed`` instead of raising on bytes that are not a message."""
    if parse is None:
        return None

    def parsed(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, RecursionError, ValueError, UnicodeDecodeError) as exc:
            return Malformed(str(exc)[:_REASON_CHARS] or type(exc).__name__)

    return parsed


def refusal(malformed: Malformed) -> str:
    return (
        f"malformed request: {malformed.reason}; send a message serialized by the "
        "cachemesh.v1 protos (the generated stubs or the cachemesh client)"
    )


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Refuses unparsable requests with INVALID_ARGUMENT (first of a server's interceptors);
    ``refused``: told the method of each one refused."""

    def __init__(self, refused: Callable[[str], None] | None = None) -> None:
        self._refused = refused
        self._checked = HandlerMemo(self._checked_handler)  # a method's, made once

    async def intercept_service(
        self, continuation: Handler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        return self._checked.of(handler, details.method)

    def _checked_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        refused = self._refused
        told = partial(refused, method) if refused is not None else _untold
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _checked_unary(handler.unary_unary, told),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            checked = (
                _checked_stream(behavior, told)
                if inspect.isasyncgenfunction(behavior)
                else _checked_unary(behavior, told)  # a stream written with context.write()
            )
            return grpc.unary_stream_rpc_method_handler(
                checked,
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _untold() -> None:
    pass


def _checked_unary(
    behavior: Callable[..., Any], refused: Callable[[], None]
) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            log.debug("refused a malformed request: %s", request.reason)
            refused()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the last resort: INTERNAL, never UNKNOWN
            await _internal(context, exc)

    return unary


def _checked_stream(
    behavior: Callable[..., Any], refused: Callable[[], None]
) -> Callable[..., AsyncIterator[Any]]:
    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            log.debug("refused a malformed request: %s", request.reason)
            refused()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the last resort: INTERNAL, never UNKNOWN
            await _internal(context, exc)

    return stream


async def _internal(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """An exception no servicer mapped: grpc would answer UNKNOWN with its text (a file path, a
    host), so the caller gets INTERNAL and its type only; the service's log has the rest. A call
    already over gets nothing (``aborts``): gRPC's own error of a status sent to it (a handler's
    abort after its deadline passed) is DEBUG, and no abort follows it (gRPC's second ERROR,
    "Abort already called!")."""
    if call_over(context):
        if raised_by_grpc(exc):
            log.debug("a status not sent to a call already over (%s)", type(exc).__name__)
        else:
            log.error("unexpected %s in a request's handling", type(exc).__name__, exc_info=exc)
        raise asyncio.CancelledError from exc
    log.error("unexpected %s in a request's handling", type(exc).__name__, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(exc).__name__}); the service logged it: retry, or report it "
        "with the request id",
    )
