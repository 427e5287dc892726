"""The HTTP routes: parse, admit, call the Gateway, answer in the caller's API shape."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cachemesh.v1 import gateway_pb2 as pb
from services.common.auth import KeyLookup
from services.common.fair_walks import FairWalks
from services.http_front import anthropic_api, facts, openai_api, sse
from services.http_front.access_log import RefusalLog
from services.http_front.errors import RATE_LIMIT_RETRY_AFTER_S, Api, ApiError, invalid
from services.http_front.fields import parse_body
from services.http_front.gateway import Gateway
from services.http_front.limits import BodyBudget, BodyFull, InFlight, Reading
from services.http_front.metrics import HttpFrontMetrics
from services.http_front.readiness import CachedVerdict
from services.http_front.settings import ESCAPE_EXPANSION, HttpFrontSettings

log = logging.getLogger("cachemesh.http_front")
_T = TypeVar("_T")
_PROPAGATOR = TraceContextTextMapPropagator()
# on the request, once a stream's head is sent: the stream, and how it ended when that is not
# its response's status (an error event at its end; the caller gone)
_STREAM = web.RequestKey("cachemesh.stream", web.StreamResponse)
_ENDED = web.RequestKey("cachemesh.ended", int)
# on the request once a write to the caller outlasted HTTP_FRONT_WRITE_TIMEOUT_S: its connection
# is closed when the handler has unwound (its Gateway call cancelled on the way)
_STALLED = web.RequestKey("cachemesh.stalled", bool)
# on the request once the Gateway has answered (its end, or a stream's start: the model call
# is then billed, cut or not): a failure of the front after that says x-should-retry: false
_ANSWERED = web.RequestKey("cachemesh.answered", bool)
# on the request once its body outlasted HTTP_FRONT_BODY_TIMEOUT_S: its 408 goes out, then its
# connection is closed (aiohttp would read what is left of the body for up to 10 s more)
_BODY_CUT = web.RequestKey("cachemesh.body_cut", bool)
# on the request once its key names a tenant: the tenant (its refusal's access line says it)
_TENANT = web.RequestKey("cachemesh.tenant", str)
# on the request once its Gateway call begins: the router writes its access line from then on;
# a refusal before that is the front's own, and the front writes its line (``access_log``)
_CALLED = web.RequestKey("cachemesh.called", bool)
# on the request before its key is checked, when the caller chose its id (a valid
# ``Idempotency-Key``): the id the Gateway knows it by, which a refusal's response names too
_CALLER_ID = web.RequestKey("cachemesh.caller_id", str)
# on the request once its body is read: its size in bytes (``_translated``)
_BODY_BYTES = web.RequestKey("cachemesh.body_bytes", int)
# A body larger than this is read from JSON and translated to the Gateway's request in a
# worker thread: translating walks every message and block in Python, and a 2.2 MB body of
# 60,000 one-letter messages held the front's event loop ~1 s (every request of every tenant
# and /healthz with it); in a thread the loop runs between the interpreter's switches. One
# smaller takes a few milliseconds at most, less than the hop to a thread would cost it.
TRANSLATE_IN_THREAD_BYTES = 64 * 1024
# the header each API names its request id in
_ID_HEADER: dict[Api, str] = {"anthropic": "request-id", "openai": "x-request-id"}
_NO_KEY = {
    "anthropic": "no API key: send it in the x-api-key header",
    "openai": "no API key: send 'Authorization: Bearer <key>'",
}
# the headers each API reads the caller's key from (``_key``)
_KEY_HEADERS: dict[Api, tuple[str, ...]] = {
    "anthropic": ("x-api-key", "authorization"),
    "openai": ("authorization",),
}
_UNKNOWN_KEY = {
    "anthropic": "invalid x-api-key: no tenant has this key",
    "openai": "Incorrect API key provided: no tenant has this key",
}


# The answer of a non-streaming request still waiting on the Gateway at the end of the grace.
# The front cannot tell whether its model call had started (it may still have been queued:
# prefill queue, single-flight wait, ledger wait), so the cut stays retryable: a request that
# never reached a model is not lost, and one that did may be billed twice (said here).
CUT = (
    "the HTTP front stopped (a restart or a deploy: its CACHEMESH_GRACE_S of {grace_s:g} s ran "
    "out) before the Gateway answered; the Gateway call was cancelled. A model call of this "
    "request may have been billed for what it produced (the front cannot tell whether one had "
    "started); a retry may be billed again, and a retry with the same Idempotency-Key is "
    "answered from the Gateway's ledger only if the first call's answer was kept"
)
# the cut's retry-after: a front restarting (or another behind the same address) takes this
# long to listen again; both SDKs honour it (up to 60 s) before their retry
CUT_RETRY_AFTER_S = 5

# The answer of a model request (POST /v1/messages, /v1/chat/completions) that arrives once the
# front drains: on a keep-alive connection it had open (its listener is closed), in the drain's
# first second, when its answers still go out (``app.drain``). Started, its model call would be
# cut at the end of the grace (a bill) and retried by the caller (a second one); refused before
# the Gateway, it costs nothing and its retry, on a new connection, reaches another front.
DRAINING = (
    "the HTTP front is stopping (a restart or a deploy) and takes no new model request; this "
    "one was not sent to the Gateway (no model call, nothing billed): retry it, a new "
    "connection reaches a front still serving"
)
# the drain refusal's retry-after: the listener is closed, so a retry's new connection goes to
# another front behind the same address at once (where none is, it is refused and the SDKs
# retry a refused connection with their own backoff)
DRAIN_RETRY_AFTER_S = 1


class CallerStalled(ConnectionError):
    """A write to the caller did not go out within ``HTTP_FRONT_WRITE_TIMEOUT_S``: the caller
    keeps its connection open but stopped reading."""


def _traceparent(span: trace.Span) -> str:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


_ROUTES = (
    "the Gateway's HTTP front serves POST /v1/messages, POST /v1/chat/completions, "
    "GET /v1/models and GET /v1/models/{id}"
)


def _speaks_anthropic(request: web.Request) -> bool:
    return "anthropic-version" in request.headers or request.path.startswith("/v1/messages")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=sse.dumps(body), status=status, headers=headers, content_type="application/json"
    )


class Front:
    def __init__(
        self,
        settings: HttpFrontSettings,
        keys: KeyLookup,
        gateway: Gateway,
        in_flight: InFlight,
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.time,
        metrics: HttpFrontMetrics | None = None,
        # ages the cached readiness verdict; times a refusal's access line
        monotonic: Callable[[], float] = time.monotonic,
        refusals: RefusalLog | None = None,
        # the bytes of bodies being read, all requests together (HTTP_FRONT_BODY_BUDGET_BYTES)
        body_budget: BodyBudget | None = None,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._gateway = gateway
        self._in_flight = in_flight
        self._tracer = tracer
        self._clock = clock
        self._metrics = metrics
        self._monotonic = monotonic
        self._refusals = refusals if refusals is not None else RefusalLog()
        if body_budget is None:
            gauge = metrics.body_bytes if metrics is not None else None
            body_budget = BodyBudget(settings.body_budget_bytes, settings.body_tenant_bytes, gauge)
        self._body_budget = body_budget
        # one thread of its own for the translation of large bodies (``_translated``), taken
        # by tenant in turn: one tenant's flood of them queues there, not in the default
        # executor, and delays another tenant's by one walk, not the whole flood
        self._walks = FairWalks("front-translate")
        self.draining = False
        # the handlers of the non-streaming requests waiting on the Gateway now, and those of
        # them ``cut`` at the end of CACHEMESH_GRACE_S: each answers its final refusal
        # (``CUT``) before its connection is closed
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._gateway_ready = CachedVerdict(gateway.serving, monotonic, settings.gateway_addr)

    # --- routes -------------------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("anthropic", request, self._messages)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("openai", request, self._chat)

    async def models(self, request: web.Request) -> web.StreamResponse:
        api: Api = "anthropic" if "anthropic-version" in request.headers else "openai"
        return await self._serve(api, request, self._models)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def ready(self) -> bool:
        """What the metrics port's ``GET /readyz`` answers (plaintext, whatever this port is)."""
        return not self.draining and await self._gateway_ready.serving()

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return _json({"status": "draining"}, 503)
        if not await self._gateway_ready.serving():  # its address: in the log, not here
            return _json({"status": "gateway not serving"}, 503)
        return _json({"status": "ready"})

    def cut(self) -> int:
        """The grace is over: each non-streaming request still waiting on the Gateway cancels
        its call (the router bills what the model produced) and answers ``CUT``; how many."""
        for task in self._waiting - self._cut:
            self._cut.add(task)
            task.cancel()
        return len(self._waiting)

    async def _complete(
        self, gw: pb.CompleteRequest, key: str, traceparent: str
    ) -> pb.CompleteResponse:
        """The Gateway's answer to a non-streaming request, or ``CUT`` once the grace is over
        (``cut``): an answer, not a closed connection, and a retryable one (``retry-after``):
        the request may never have reached a model, and a retry is then its only answer."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await self._gateway.complete(gw, key, traceparent)  # a cancel cancels it
        except asyncio.CancelledError:
            # cut, and not also cancelled by aiohttp (the caller gone): answer, not unwind
            if task in self._cut and task.uncancel() == 0:
                raise ApiError(
                    "overloaded",
                    CUT.format(grace_s=self._settings.grace_s),
                    retry_after_s=CUT_RETRY_AFTER_S,
                ) from None
            raise
        finally:
            self._waiting.discard(task)
            self._cut.discard(task)

    def _take_model_request(self) -> None:
        """Refuses a model request once the drain has begun (``DRAINING``): 529 / 503 with a
        ``retry-after``, which both SDKs retry, its connection closed after it (the drain's
        ``Connection: close``); the cheap GETs (models, health) are still answered."""
        if self.draining:
            raise ApiError("overloaded", DRAINING, retry_after_s=DRAIN_RETRY_AFTER_S)

    # --- the common path ----------------------------------------------------------------------
    async def _serve(
        self,
        api: Api,
        request: web.Request,
        answer: Callable[[web.Request, str, str, str], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """One request in a server span that joins the caller's trace (``traceparent``)."""
        metrics = self._metrics
        if metrics is None:
            return await self._traced(api, request, answer)
        began = metrics.clock()
        metrics.in_flight.inc()
        status = 499  # the caller went away (nginx's code: no response was sent)
        try:
            response = await self._traced(api, request, answer)
            status = request.get(_ENDED, response.status)
            return response
        finally:
            metrics.in_flight.dec()
            metrics.answered(api, _route(request), status, began)

    async def _traced(
        self,
        api: Api,
        request: web.Request,
        answer: Callable[[web.Request, str, str, str], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        parent = _PROPAGATOR.extract(carrier=request.headers)
        route = _route(request)
        name = f"{request.method} {route}"  # the route's pattern: a bounded set of names
        began = self._monotonic()
        with self._tracer.start_as_current_span(name, parent, trace.SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("http.route", route)
            span.set_attribute("url.path", request.path)
            traceparent = _traceparent(span)
            refused: ApiError | None = None  # the front's own refusal (its access line)
            # the caller's id names each refusal, the front's own before its body is read
            # too; one it cannot take is refused with the body's fields (``_cache_options``)
            with contextlib.suppress(ApiError):
                caller_id = facts.idempotency_key(request.headers)
                if caller_id:
                    request[_CALLER_ID] = caller_id
            try:
                tenant, key = await self._admit(api, request)
                response = await answer(request, tenant, key, traceparent)
            except ApiError as error:
                span.set_attribute("error.type", error.kind)
                response = await self._failed(api, request, error, traceparent)
                refused = error
            except ConnectionError as exc:
                if _STREAM not in request:
                    raise
                # the caller went away mid-stream (a write failed), or stopped reading (a write
                # timed out): nothing to answer
                stalled = isinstance(exc, CallerStalled)
                why = str(exc) if stalled else type(exc).__name__
                log.info("%s: the caller went away mid-stream (%s)", name, why)
                span.set_attribute("error.type", "client_stalled" if stalled else "client_gone")
                request[_ENDED] = 499
                response = request[_STREAM]
            except asyncio.CancelledError:
                # the caller disconnected while its answer was awaited: aiohttp cancels the
                # handler (handler_cancellation), and the call with it. No response goes out;
                # the span says what the metric counts (499), then the cancel goes on.
                span.set_attribute("error.type", "client_gone")
                span.set_attribute("http.response.status_code", 499)
                raise
            except Exception as exc:  # a bug here: the caller still gets its API's error shape
                log.exception("http-front failed on %s", name)
                span.record_exception(exc)
                why = "the HTTP front failed on this request; see its log"
                answered = bool(request.get(_ANSWERED))
                if answered:  # not retried: a retry would be a model call and a bill again
                    why += " (the Gateway had answered it, and billed the answer)"
                failed = ApiError("api", why, final=answered)
                response = await self._failed(api, request, failed, traceparent)
                refused = failed
            if request.get(_STALLED) and request.transport is not None:
                # the write still waiting on the caller is dropped with its connection (aiohttp
                # would otherwise wait on it to end the response)
                request.transport.abort()
            if request.get(_BODY_CUT) and request.transport is not None:
                await _answer_and_close(request, response)
            span.set_attribute("http.response.status_code", response.status)  # as sent
            # a stream whose head went out ends by its error event's status (``_ENDED``)
            ended = request.get(_ENDED, response.status)
            if ended >= 500:  # the server's failure (a 4xx is the caller's)
                why = f"HTTP {ended}"
                if ended != response.status:
                    why += f" after the {response.status}'s head: the stream ended in its error"
                span.set_status(trace.Status(trace.StatusCode.ERROR, why))
            if refused is not None and not request.get(_CALLED):  # the router never saw it
                self._refusals.refused(
                    request.get(_TENANT, ""),
                    response.headers.get("x-cachemesh-request-id", ""),
                    name,
                    refused.code,
                    ended,
                    self._monotonic() - began,
                )
            log.debug("%s answered %d", name, response.status)
            return response

    async def _sent(self, request: web.Request, write: Awaitable[None]) -> None:
        """One write of a stream (an event, a ping, its end), within
        ``HTTP_FRONT_WRITE_TIMEOUT_S``. A write waits only while the caller's socket is full: a
        caller that stopped reading but keeps its connection open would hold its in-flight slot
        and its Gateway call (the model call, the L1 lease of its question) until the Gateway's
        deadline, and for ever once the Gateway has sent the whole answer. ``CallerStalled``
        ends the request: its Gateway call is cancelled (the router bills what was produced)
        and its connection closed."""
        try:
            async with asyncio.timeout(self._settings.write_timeout_s):
                await write
        except TimeoutError:
            request[_STALLED] = True
            raise CallerStalled(
                f"the caller read nothing for {self._settings.write_timeout_s:g} s "
                "(HTTP_FRONT_WRITE_TIMEOUT_S)"
            ) from None

    async def _failed(
        self, api: Api, request: web.Request, error: ApiError, traceparent: str
    ) -> web.StreamResponse:
        """The error in the API's shape: a response of its own, or, once a stream's head went
        out, an error event at the end of that stream (a second response would write a
        second status line into the body)."""
        stream: web.StreamResponse | None = request.get(_STREAM)
        if stream is None:
            return self._error(
                api, error, traceparent, request.get(_CALLER_ID, "") or error.request_id
            )
        request[_ENDED] = error.status_for(api)
        # the head names the caller's id, or none yet (it went out before the Gateway's start,
        # with pings): then the id the Gateway made up for its refusal
        named = stream.headers.get(_ID_HEADER[api], "") or error.request_id
        body = error.body_for(api, named)
        with contextlib.suppress(ConnectionError, RuntimeError):  # the caller may be gone
            frame = sse.event("error", body) if api == "anthropic" else sse.data(body)
            await self._sent(request, stream.write(frame))
            await self._sent(request, stream.write_eof())
        return stream

    def no_route(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        """A path the front does not serve (404) or a method it does not take there (405), in
        the shape of the API the caller speaks, so its SDK raises its own error with a message
        (aiohttp's plain text left them a bare "Error code: 404")."""
        api: Api = "anthropic" if _speaks_anthropic(request) else "openai"
        asked = f"{request.method} {request.path[:200]}"
        if exc.status == 405:
            error = ApiError("no_method", f"Invalid method for URL ({asked}): {_ROUTES}")
        else:
            error = ApiError("no_route", f"Invalid URL ({asked}): {_ROUTES}")
        response = self._error(api, error, "")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    def _error(
        self, api: Api, error: ApiError, traceparent: str, request_id: str = ""
    ) -> web.Response:
        """The error's response, named by ``request_id`` (the caller's ``Idempotency-Key``,
        or the id the Gateway made up for its refusal: as the Gateway knows the request), else
        by a fresh id (the front's own refusal: its access line names that id)."""
        request_id = request_id or uuid.uuid4().hex
        headers = {**error.headers(), "x-cachemesh-request-id": request_id}
        if traceparent:
            headers["traceparent"] = traceparent
        headers[_ID_HEADER[api]] = request_id
        return _json(error.body_for(api, request_id), error.status_for(api), headers)

    async def _admit(self, api: Api, request: web.Request) -> tuple[str, str]:
        """The caller's tenant and key; the Gateway checks the same key again."""
        for header in _KEY_HEADERS[api]:  # the first was read: whatever added one chose
            sent = len(request.headers.getall(header, ()))
            if sent > 1:
                raise ApiError(
                    "authentication",
                    f"the {header} header is sent {sent} times: send the API key once (a "
                    "request carrying two is refused, whichever of them is right)",
                )
        key = _key(api, request)
        if key is None:
            raise ApiError("authentication", _NO_KEY[api])
        tenant = await self._keys.checked_tenant_for(key)
        if tenant is None:
            raise ApiError("authentication", _UNKNOWN_KEY[api])
        request[_TENANT] = tenant
        if api == "anthropic" and request.method == "POST":
            version = request.headers.get("anthropic-version")
            if version is None:
                raise invalid("anthropic-version: header is required (e.g. 2023-06-01)")
            if not anthropic_api.VERSION.match(version):
                raise invalid(
                    f"anthropic-version: {version[:32]!r} is not a valid version (a date such "
                    "as 2023-06-01)"
                )
        return tenant, key

    async def _body(self, api: Api, request: web.Request, tenant: str) -> dict[str, Any]:
        """The body's JSON, read up to ``max_json_bytes``: the size that counts is its
        request's (``_sized``), which escapes do not swell. One over ``max_body_bytes`` is
        parsed only when its request could be under it (``_least_request``) and it holds no
        more JSON values than one under it could (parsing is the cost that grows with them).
        Its declared length is reserved of ``tenant``'s share of the front's ``BodyBudget``
        before it is read, and its bytes taken of the budget as they arrive, until it is
        parsed: no room for them (or its share none for its declared length), a 529 / 503 the
        SDKs retry (``_no_room``)."""
        settings = self._settings
        most = settings.max_json_bytes
        if request.content_length is not None and request.content_length > most:
            raise _json_too_large(request.content_length, settings.max_body_bytes)
        with self._body_budget.reading(tenant) as held:
            try:
                held.reserve(request.content_length or 0)
                raw = await self._read_in_time(request, held)
            except BodyFull:
                raise self._no_room(api, request) from None
            if len(raw) > settings.max_body_bytes:
                _least_request(raw, settings.max_body_bytes)
                _few_values(raw, settings.max_body_bytes)
            request[_BODY_BYTES] = len(raw)
            return await _translated(self._walks, request, tenant, partial(parse_body, raw, api))

    async def _read_in_time(self, request: web.Request, held: Reading) -> bytes:
        settings = self._settings
        wait_s = settings.body_timeout_s
        try:
            async with asyncio.timeout(wait_s):
                raw = await _read(request, settings.max_json_bytes, held)
        except TimeoutError:
            # a body dripped a byte at a time held its buffer and its connection for ever
            request[_BODY_CUT] = True
            raise ApiError(
                "request_timeout",
                f"request body not received whole within {wait_s:g} s of its headers; send "
                "it without pauses (the connection is closed)",
            ) from None
        if raw is None:
            raise _json_too_large(None, settings.max_body_bytes)
        return raw

    def _no_room(self, api: Api, request: web.Request) -> ApiError:
        """The refusal of a body the front's ``BodyBudget`` had no room for: the front's
        overload (529 / 503, ``retry-after``), which both SDKs retry. The rest of its body is
        read and dropped after the refusal (aiohttp's lingering read, up to 10 s): closed at
        once, a connection whose caller is still sending is reset, and its SDK may see no
        answer but the reset."""
        if self._metrics is not None:
            self._metrics.body_refused(api)
        size = request.content_length
        sized = f"its {size:,} bytes" if size is not None else "its bytes"
        budget = self._body_budget
        return ApiError(
            "overloaded",
            f"the HTTP front is busy reading other requests' bodies: no room for {sized} (it "
            f"reads at most {budget.limit:,} bytes of bodies at once, its "
            f"HTTP_FRONT_BODY_BUDGET_BYTES, at most {budget.tenant_limit:,} of them one "
            "tenant's); retry shortly",
            retry_after_s=RATE_LIMIT_RETRY_AFTER_S,
        )

    def _sized(self, gw: pb.CompleteRequest) -> pb.CompleteRequest:
        """``gw`` when the Gateway takes its size: it is measured as the router measures
        ROUTER_MAX_REQUEST_BYTES (serialized), against HTTP_FRONT_MAX_BODY_BYTES."""
        size = gw.ByteSize()
        limit = self._settings.max_body_bytes
        if size > limit:
            # as the router's span of a request over its limit says it
            trace.get_current_span().set_attribute("cachemesh.request_bytes", size)
            raise ApiError(
                "request_too_large",
                f"request too large: {size:,} bytes as the Gateway's request (serialized, as "
                f"the router measures it; the text, not its JSON escapes), at most {limit:,} "
                "bytes (the HTTP front's HTTP_FRONT_MAX_BODY_BYTES, the Gateway's "
                "ROUTER_MAX_REQUEST_BYTES): send a shorter prompt (fewer or shorter messages, "
                "tools or documents), or ask the operator to raise both",
            )
        return gw

    # --- Anthropic ----------------------------------------------------------------------------
    async def _messages(
        self, request: web.Request, tenant: str, key: str, traceparent: str
    ) -> web.StreamResponse:
        self._take_model_request()
        with self._in_flight.slot(tenant):  # before the body: one still coming holds its slot
            body = await self._body("anthropic", request, tenant)
            gw, stream = await _translated(
                self._walks,
                request,
                tenant,
                partial(
                    anthropic_api.parse_request,
                    body,
                    thinks_by_default=self._settings.thinks_by_default,
                ),
            )
            del body  # not held through the call
            _cache_options(request, gw)
            return await self._anthropic(request, self._sized(gw), stream, key, traceparent)

    async def _anthropic(
        self, request: web.Request, gw: pb.CompleteRequest, stream: bool, key: str, traceparent: str
    ) -> web.StreamResponse:
        request[_CALLED] = True
        if not stream:
            end = await self._complete(gw, key, traceparent)
            request[_ANSWERED] = True
            headers = facts.end_headers(end, traceparent)
            headers[_ID_HEADER["anthropic"]] = end.request_id
            return _json(anthropic_api.response(end), headers=headers)
        events = anthropic_api.EventStream()
        ping = sse.event(*anthropic_api.PING)
        # the pacer closes first (its pending read cancelled), then the call: a write that
        # fails while a read is pending must not close the call under it
        async with (
            aclosing(self._gateway.stream(gw, key, traceparent)) as chunks,
            aclosing(sse.paced(chunks, self._settings.ping_s)) as paced,
        ):
            start, opened = await self._started(request, gw, paced, "anthropic", ping, traceparent)
            response = opened or await self._open_stream(request, start, "anthropic", traceparent)
            for name, body in events.start(start.start):
                await self._sent(request, response.write(sse.event(name, body)))
            try:
                async for chunk in paced:
                    for name, body in _anthropic_events(events, chunk):
                        await self._sent(request, response.write(sse.event(name, body)))
            except ApiError as error:
                _ended_by(request, "anthropic", error)
                body = error.body_for("anthropic", start.start.request_id)
                await self._sent(request, response.write(sse.event("error", body)))
        await self._sent(request, response.write_eof())
        return response

    # --- OpenAI -------------------------------------------------------------------------------
    async def _chat(
        self, request: web.Request, tenant: str, key: str, traceparent: str
    ) -> web.StreamResponse:
        self._take_model_request()
        with self._in_flight.slot(tenant):  # before the body: one still coming holds its slot
            origins = openai_api.Origins()
            gw, stream, include_usage = await self._chat_request(request, tenant, origins)
            try:
                return await self._openai(request, gw, stream, include_usage, key, traceparent)
            except ApiError as error:
                if error.kind != "invalid_request":
                    raise
                # the Gateway's paths name its request's messages and fields, not the
                # caller's; the caller's field it names first is OpenAI's ``param``
                said = openai_api.at_caller(error.message, origins)
                param = error.param or openai_api.param_of(said, origins)
                raise dataclasses.replace(error, message=said, param=param) from None

    async def _chat_request(
        self, request: web.Request, tenant: str, origins: openai_api.Origins
    ) -> tuple[pb.CompleteRequest, bool, bool]:
        """The Gateway request of a chat completion, its body's JSON dropped (not held through
        the call); ``origins``: where its parts came from in the caller's."""
        body = await self._body("openai", request, tenant)
        model = body.get("model")
        default = self._settings.default_max_tokens.get(
            model if isinstance(model, str) else "", 1024
        )
        gw, stream, include_usage = await _translated(
            self._walks,
            request,
            tenant,
            partial(
                openai_api.parse_request,
                body,
                default,
                origins,
                thinks_by_default=self._settings.thinks_by_default,
            ),
        )
        _cache_options(request, gw)
        return self._sized(gw), stream, include_usage

    async def _openai(
        self,
        request: web.Request,
        gw: pb.CompleteRequest,
        stream: bool,
        include_usage: bool,
        key: str,
        traceparent: str,
    ) -> web.StreamResponse:
        created = int(self._clock())
        request[_CALLED] = True
        if not stream:
            end = await self._complete(gw, key, traceparent)
            request[_ANSWERED] = True
            headers = facts.end_headers(end, traceparent)
            headers[_ID_HEADER["openai"]] = end.request_id
            return _json(openai_api.response(end, created), headers=headers)
        chunker = openai_api.ChunkStream(created, include_usage)
        async with (
            aclosing(self._gateway.stream(gw, key, traceparent)) as chunks,
            aclosing(sse.paced(chunks, self._settings.ping_s)) as paced,
        ):
            start, opened = await self._started(
                request, gw, paced, "openai", sse.COMMENT_PING, traceparent
            )
            response = opened or await self._open_stream(request, start, "openai", traceparent)
            for item in chunker.start(start.start):
                await self._sent(request, response.write(sse.data(item)))
            try:
                async for chunk in paced:
                    if chunk is None:
                        await self._sent(request, response.write(sse.COMMENT_PING))
                        continue
                    for item in _openai_chunks(chunker, chunk):
                        await self._sent(request, response.write(sse.data(item)))
            except ApiError as error:
                _ended_by(request, "openai", error)
                body = error.body_for("openai", start.start.request_id)
                await self._sent(request, response.write(sse.data(body)))
        await self._sent(request, response.write(sse.DONE))
        await self._sent(request, response.write_eof())
        return response

    async def _started(
        self,
        request: web.Request,
        gw: pb.CompleteRequest,
        paced: AsyncIterator[pb.CompleteChunk | None],
        api: Api,
        ping: bytes,
        traceparent: str,
    ) -> tuple[pb.CompleteChunk, web.StreamResponse | None]:
        """The stream's ``start``, and the stream if it had to be opened before it. A refusal
        that comes first has its own HTTP status. The Gateway sends the start with the first
        token, so a long prefill is silent: once ``ping_s`` passes without it, the stream's head
        goes out with what is known (the trace; the request id if the caller chose it) and a
        ping every ``ping_s``, lest an SDK's read timeout or a proxy's idle timeout cut the
        wait (and the SDK send the whole prompt again). A refusal after that is the stream's
        error event (``_failed``)."""
        opened: web.StreamResponse | None = None
        async for chunk in paced:
            if chunk is not None:
                if chunk.WhichOneof("part") != "start":
                    break
                request[_ANSWERED] = True
                return chunk, opened
            if opened is None:
                trace_id = traceparent.split("-")[1] if traceparent else ""
                head = pb.CompleteResponse(request_id=gw.request_id, trace_id=trace_id)
                opened = await self._open_stream(
                    request, pb.CompleteChunk(start=head), api, traceparent
                )
            await self._sent(request, opened.write(ping))
        raise ApiError("api", "the Gateway's stream did not begin with its start")

    async def _open_stream(
        self, request: web.Request, start: pb.CompleteChunk, api: Api, traceparent: str
    ) -> web.StreamResponse:
        headers = facts.start_headers(start.start, traceparent)
        if start.start.request_id:
            headers[_ID_HEADER[api]] = start.start.request_id
        headers["cache-control"] = "no-cache"
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        await response.prepare(request)
        request[_STREAM] = response  # from here on, an error ends this stream
        return response

    # --- models -------------------------------------------------------------------------------
    async def _models(
        self, request: web.Request, tenant: str, key: str, traceparent: str
    ) -> web.StreamResponse:
        wanted = request.match_info.get("model")
        api: Api = "anthropic" if "anthropic-version" in request.headers else "openai"
        models = self._settings.models
        if wanted is not None:
            if wanted not in models:
                raise ApiError(
                    "not_found", f"model: {wanted[:64]!r} not found; use one of {', '.join(models)}"
                )
            models = (wanted,)
        if api == "anthropic":
            rows = [
                {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
                for m in models
            ]
            if wanted is not None:
                return _json(rows[0])
            return _json(
                {
                    "data": rows,
                    "has_more": False,
                    "first_id": rows[0]["id"],
                    "last_id": rows[-1]["id"],
                }
            )
        items = [
            {"id": m, "object": "model", "created": 0, "owned_by": "cachemesh"} for m in models
        ]
        if wanted is not None:
            return _json(items[0])
        return _json({"object": "list", "data": items})


def _cache_options(request: web.Request, gw: pb.CompleteRequest) -> None:
    """The ``x-cachemesh-*`` headers and ``Idempotency-Key`` on ``gw``; the caller's id kept
    on ``request`` for a refusal's response."""
    facts.cache_options(request.headers, gw)
    if gw.request_id:
        request[_CALLER_ID] = gw.request_id


def _key(api: Api, request: web.Request) -> str | None:
    """The caller's key, or None (a 401): a key is ASCII, anything else is no key of ours."""
    if api == "anthropic":
        key = request.headers.get("x-api-key")
        if key:
            return key.strip() if key.isascii() else None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip() if token.isascii() else None
    return None


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Sends ``response`` and closes the connection once it has gone out, without reading
    the rest of the request's body."""
    response.force_close()
    with contextlib.suppress(ConnectionError, RuntimeError):  # the caller may be gone
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()


def _ended_by(request: web.Request, api: Api, error: ApiError) -> None:
    """A stream whose head went out ends in ``error``'s event: its metrics count the error's
    status, not the 200 of its head, and the server span carries the error's kind."""
    request[_ENDED] = error.status_for(api)
    trace.get_current_span().set_attribute("error.type", error.kind)


async def _read(request: web.Request, most: int, held: Reading) -> bytes | None:
    """The body, or None once it is over ``most`` bytes (decompressed). Not kept on the request,
    as aiohttp's ``read`` keeps it until the response: through a call of minutes. Each chunk
    kept is covered by ``held`` (``BodyFull`` when it cannot be)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > most:
            return None
        held.cover(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def _translated(
    walks: FairWalks, request: web.Request, tenant: str, translate: Callable[[], _T]
) -> _T:
    """``translate()``, in ``walks``' thread in ``tenant``'s turn when the request's body is
    over ``TRANSLATE_IN_THREAD_BYTES``: on a first-come thread, tenant b's 76 kB request
    waited 1.03 s behind tenant a's 10 x 1 MB (0.015 s alone)."""
    if request.get(_BODY_BYTES, 0) > TRANSLATE_IN_THREAD_BYTES:
        return await walks.run(tenant, translate)
    return translate()


def _json_too_large(size: int | None, limit: int) -> ApiError:
    got = f" ({size:,} bytes)" if size is not None else ""
    return ApiError(
        "request_too_large",
        f"request body too large{got}: at most {limit * ESCAPE_EXPANSION:,} bytes of JSON "
        f"({ESCAPE_EXPANSION} times the HTTP front's HTTP_FRONT_MAX_BODY_BYTES, a request of "
        f"{limit:,} bytes, its text all written as \\uXXXX escapes): send a shorter prompt, or "
        "ask the operator to raise it",
    )


# the bytes of JSON a request may hold beyond its text for each of its members and values (a
# colon, comma or opening bracket): a member's name and its quotes, an enum's text (a role, a
# block's type), a number, the field's tag in the Gateway's request not counted
STRUCTURE_BYTES = 64
# a body up to this many times HTTP_FRONT_MAX_BODY_BYTES is parsed before its size is known
PARSED_OVER = 2


def _least_request(raw: bytes, limit: int) -> None:
    """A 413 unless ``raw``, a body over ``limit``, could be a request of at most ``limit``
    bytes, before it is parsed (a plain-ASCII body of 12 MiB took 52 to 81 ms of the event
    loop to parse and build before its 413; this, 17 ms). Only a body over ``PARSED_OVER``
    times the limit: one under it costs at most that many times a body at the limit, and its
    413 names the size the router measures (``_sized``). The least request a body makes: its
    bytes, less 5 for each backslash (a ``\\uXXXX`` escape, 6 bytes, is 1 at least in UTF-8;
    any other escape saves 1), 1 for each whitespace byte and ``STRUCTURE_BYTES`` for each
    colon, comma and opening bracket (a member or value: its name, quotes, an enum). A request
    refused here is one the router refuses too (but, as ``_few_values``, for one padded with
    long values of fields the front drops, such as OpenAI's ``metadata``)."""
    if len(raw) <= PARSED_OVER * limit:
        return
    structure = len(raw) - len(raw.translate(None, b":,{["))  # one pass each, in C
    spaces = len(raw) - len(raw.translate(None, b" \n\r\t"))
    least = len(raw) - 5 * raw.count(b"\\") - spaces - STRUCTURE_BYTES * structure
    if least > limit:
        raise ApiError(
            "request_too_large",
            f"request too large: its JSON of {len(raw):,} bytes holds at least {least:,} bytes "
            f"of text, over {limit:,}, the HTTP front's HTTP_FRONT_MAX_BODY_BYTES (measured as "
            "the Gateway's request, its text not its escapes): send a shorter prompt, or ask "
            "the operator to raise it",
        )


def _few_values(raw: bytes, limit: int) -> None:
    """A 413 unless ``raw``, a body over ``limit``, holds at most ``limit`` commas and opening
    brackets and braces. Each JSON value or member but the first follows one (a member's
    value, its name's colon), so their count bounds what parsing builds: at most 1.5 times
    what a body at the limit can (``[{},{},...]``: ``limit / 3`` objects there, ``limit / 2``
    here). Unchecked, a body of ``ESCAPE_EXPANSION`` times the limit built six times as much
    (``{},`` in 12 MiB: 300 MiB, seconds of the event loop). Each one in a request the Gateway
    takes stands for a byte of it at least (a comma of its text; the tag of a message, a block,
    a tool), so a request refused here is one the router refuses too (but for one padded with
    fields the front drops, such as OpenAI's ``metadata``)."""
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > limit:
        raise ApiError(
            "request_too_large",
            f"request too large: its JSON holds {values:,} values (commas, brackets and "
            f"braces) in {len(raw):,} bytes, over {limit:,}, the HTTP front's "
            "HTTP_FRONT_MAX_BODY_BYTES (a request of that many bytes holds fewer): send a "
            "shorter prompt (fewer messages, tools or items), or ask the operator to raise it",
        )


def _anthropic_events(
    events: anthropic_api.EventStream, chunk: pb.CompleteChunk | None
) -> list[anthropic_api.Event]:
    if chunk is None:
        return [anthropic_api.PING]
    part = chunk.WhichOneof("part")
    if part == "delta":
        return events.delta(chunk.delta)
    if part == "end":
        return events.end(chunk.end, facts.stream_facts(chunk.end))
    return []


def _openai_chunks(
    chunker: openai_api.ChunkStream, chunk: pb.CompleteChunk
) -> list[dict[str, Any]]:
    part = chunk.WhichOneof("part")
    if part == "delta":
        return chunker.delta(chunk.delta)
    if part == "end":
        return chunker.end(chunk.end, facts.stream_facts(chunk.end))
    return []


def _route(request: web.Request) -> str:
    """The matched route's pattern (``/v1/models/{model}``), never the path itself (a caller's
    free text); ``unknown`` when no route matched."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unknown"
