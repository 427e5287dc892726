"""One span per gRPC call: a SERVER span where a call is received, a CLIENT span where one is made.

Written for cost: opentelemetry-instrumentation-grpc's aio interceptors parse the peer, copy
the metadata twice, wrap the servicer context, and on the client side put every call through
grpc's interceptor machinery (a task and two awaits more per call); under ``make bench``
they were the largest single item of the router's and the caches' CPU. These spans keep what
a trace needs and the semantic conventions name: the full method as the span name, the kind,
``rpc.system`` / ``rpc.service`` / ``rpc.method`` / ``rpc.grpc.status_code``, an error status
with the call's details, and the W3C context in the call's metadata through the configured
propagator (``OTEL_PROPAGATORS``, tracecontext and baggage by default). The spans themselves
are ``call_spans.CallSpan``s: the SDK's span, made for any use, cost more than the rest.

A handler can hold its SERVER span open past the call's end (``end_after``) for what it
learns only then (the router's bill of a model call the caller cancelled): the span ends when
that is known, at the time the call ended.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from services.common.call_spans import start_call_span
from services.common.grace import GRACE_ENDED, GraceEnd
from services.common.handler_memo import HandlerMemo

Handler = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]
Metadata = tuple[tuple[str, str], ...]

_STATUS = "rpc.grpc.status_code"
# each status's number, read once: an enum member's ``value`` is a descriptor lookup, on
# every call's span (a recorded one or not)
_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
_UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes are not requests
_HELD = otel_context.create_key("cachemesh.rpc.held")  # the call's ``end_after`` sequences
Held = list[Sequence["asyncio.Future[Any]"]]


def method_attributes(method: str) -> dict[str, AttributeValue]:
    """``rpc.*`` attributes of a full method name (``/package.Service/Method``)."""
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def end_call_span(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
    """Records the call's status on its span and ends it."""
    _call_status(span, code, details)
    span.end()


def end_cancelled_call_span(span: trace.Span) -> None:
    """Ends the span of a call this process gave up itself (its own caller left, or it no
    longer wants the rest of a stream): ``rpc.grpc.status_code`` CANCELLED, and no ERROR
    status, which would blame the callee for what it did not do (as a SERVER span leaves a
    caller's cancel)."""
    span.set_attribute(_STATUS, _NUMBERS[grpc.StatusCode.CANCELLED])
    span.end()


# The codes that make a SERVER span an error (OpenTelemetry's RPC conventions for gRPC): the
# server's own failures. The others (INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED,
# NOT_FOUND, FAILED_PRECONDITION, ...) are the caller's request refused, as an HTTP server's
# 4xx: the status stays unset, ``rpc.grpc.status_code`` tells them. A CLIENT span is an error
# for every code but OK.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _call_status(
    span: trace.Span, code: grpc.StatusCode, details: str, *, server: bool = False
) -> None:
    span.set_attribute(_STATUS, _NUMBERS[code])
    if code is not grpc.StatusCode.OK and (not server or code in SERVER_ERRORS):
        description = f"{code.name}: {details}" if details else code.name
        span.set_status(Status(StatusCode.ERROR, description))


def end_after(pending: Sequence[asyncio.Future[Any]]) -> None:
    """The current call's SERVER span ends only once the futures in ``pending`` when the call
    ends are done and their done-callbacks have run (a list the handler may still fill until
    then), so that what they write on it is there; it ends at the time the call ended. Called
    from the handler, before it ends (its own finally runs before the span's end); outside a
    traced call, nothing."""
    held = otel_context.get_value(_HELD)
    if isinstance(held, list):
        held.append(pending)


class ServerTracing(grpc.aio.ServerInterceptor):
    """A SERVER span around each call, child of the caller's span when the call carries one."""

    def __init__(
        self,
        tracer: trace.Tracer,
        grace_end: GraceEnd | None = None,
        callers_baggage: bool = True,
    ) -> None:
        """``grace_end``: the server's, set when its drain's grace ends: a call cut then is
        recorded UNAVAILABLE (an error, as its caller saw it), not as its caller's cancel.
        ``callers_baggage``: False where the callers are tenants (the router's Gateway): their
        trace context is taken (a caller's own trace goes on through the gateway), their W3C
        baggage is not, so the entries a tenant writes (up to 8 KB) never ride on the internal
        calls the request makes (no service reads baggage)."""
        self._tracer = tracer
        self._grace_end = grace_end
        self._callers_baggage = callers_baggage
        self._traced = HandlerMemo(self._traced_handler)  # a method's, made once

    async def intercept_service(
        self, continuation: Handler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(_UNTRACED):
            return handler
        return self._traced.of(handler, method)

    def _traced_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        attributes = method_attributes(method)
        tracer = self._tracer
        callers_baggage = self._callers_baggage

        def start(
            context: grpc.aio.ServicerContext[Any, Any],
        ) -> tuple[trace.Span, Held, otel_context.Context]:
            """The call's span, child of the caller's span its metadata carries."""
            carrier = {key: value for key, value in context.invocation_metadata() or ()}
            parent = propagate.extract(carrier)
            if not callers_baggage:
                parent = baggage.clear(parent)
            span = start_call_span(tracer, method, attributes, SpanKind.SERVER, parent)
            held: Held = []
            current = otel_context.set_value(_HELD, held, trace.set_span_in_context(span, parent))
            return span, held, current

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _traced_unary(handler.unary_unary, start, self._grace_end),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _traced_stream(handler.unary_stream, start, self._grace_end),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no such method in this project: served untraced rather than refused


def _ended(
    span: trace.Span,
    held: Held,
    context: grpc.aio.ServicerContext[Any, Any],
    outcome: grpc.StatusCode,
    grace_end: GraceEnd | None,
) -> None:
    """``outcome``: the status when the servicer set none (OK; CANCELLED when the caller left,
    or UNAVAILABLE when the server's grace ended; INTERNAL for an exception, as ``wire``'s
    last resort answers it)."""
    code = context.code()
    if not isinstance(code, grpc.StatusCode):
        code = outcome
    if code is grpc.StatusCode.CANCELLED and grace_end is not None and grace_end.ended:
        _call_status(span, grpc.StatusCode.UNAVAILABLE, GRACE_ENDED)  # the server cut it
    elif code is grpc.StatusCode.CANCELLED:  # the caller's choice: no error on the server's span
        span.set_attribute(_STATUS, _NUMBERS[code])
    else:
        details = context.details()
        text = details.decode() if isinstance(details, bytes) else details or ""
        _call_status(span, code, text, server=True)
    # Done ones too: a future done this very turn may still have its done-callbacks (what it
    # writes on the span) queued; gather's own callbacks on it run after them.
    pending = [future for futures in held for future in futures]
    if not pending:
        span.end()
        return
    ended_ns = time.time_ns()  # the spans' clock
    waited = asyncio.gather(*pending, return_exceptions=True)  # a failed one: ends all the same
    waited.add_done_callback(lambda _: span.end(end_time=ended_ns))


Start = Callable[
    [grpc.aio.ServicerContext[Any, Any]], tuple[trace.Span, Held, otel_context.Context]
]


def _traced_unary(
    behavior: Callable[..., Awaitable[Any]],
    start: Start,
    grace_end: GraceEnd | None,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        span, held, current = start(context)
        token = otel_context.attach(current)  # one task from here to its detach
        outcome = grpc.StatusCode.INTERNAL
        try:
            reply = await behavior(request, context)
            outcome = grpc.StatusCode.OK
            return reply
        except asyncio.CancelledError:
            outcome = grpc.StatusCode.CANCELLED  # the caller left: not a server error
            raise
        finally:
            otel_context.detach(token)
            _ended(span, held, context, outcome, grace_end)

    return unary


def _traced_stream(
    behavior: Callable[..., AsyncGenerator[Any, None]],
    start: Start,
    grace_end: GraceEnd | None,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    """The span's context is current for each step of the handler's generator (its next item,
    its close), attached and detached around that step, never across a yield: a caller that
    leaves while grpc writes has the generator closed by asyncio's finalizer, in another task
    and context, where a detach of a token attached in the call's own task fails (OpenTelemetry
    logs "Failed to detach context" at ERROR)."""

    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        span, held, current = start(context)
        outcome = grpc.StatusCode.INTERNAL
        items = behavior(request, context)
        try:
            while True:
                token = otel_context.attach(current)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                yield item
            outcome = grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            outcome = grpc.StatusCode.CANCELLED  # the caller left: not a server error
            raise
        finally:
            # closed here when the caller leaves (not when the garbage collector finds it),
            # in the span's context: the handler's finally runs before its span ends
            token = otel_context.attach(current)
            try:
                await items.aclose()
            finally:
                otel_context.detach(token)
                _ended(span, held, context, outcome, grace_end)

    return stream


class ClientSpans:
    """Starts the CLIENT span of a call the process makes, and the metadata that carries it."""

    def __init__(self, tracer: trace.Tracer, metadata: Metadata = ()) -> None:
        self._tracer = tracer
        self._metadata = metadata  # sent with every call (the internal credential)
        self._attributes: dict[str, Mapping[str, AttributeValue]] = {}

    def start(self, method: str) -> tuple[trace.Span, Metadata]:
        attributes = self._attributes.get(method)
        if attributes is None:
            attributes = self._attributes.setdefault(method, method_attributes(method))
        span = start_call_span(self._tracer, method, attributes)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, trace.set_span_in_context(span))
        return span, self._metadata + tuple(carrier.items())
