"""The HTTP routes: parse, admit, call the Gateway, answer in the caller's API shape. The
caller is admitted by ``admission``, its body read by ``bodies``; ``stopping`` answers while
the front stops, ``model_list`` lists the models; ``marks`` are what a request carries."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cachemesh.v1 import gateway_pb2 as pb
from services.common.auth import KeyLookup
from services.common.errors import Code
from services.http_front import anthropic_api, facts, model_list, openai_api, sse
from services.http_front.access_log import RefusalLog
from services.http_front.admission import AnthropicVersions, admit
from services.http_front.bodies import Bodies
from services.http_front.errors import Api, ApiError
from services.http_front.gateway import Gateway
from services.http_front.limits import BodyBudget, InFlight
from services.http_front.marks import (
    ANSWERED,
    ANTHROPIC_VERSION,
    BODY_CUT,
    CALLED,
    CALLER_ID,
    ENDED,
    REACHED,
    STALLED,
    STREAM,
    TENANT,
)
from services.http_front.metrics import HttpFrontMetrics
from services.http_front.readiness import CachedVerdict
from services.http_front.settings import HttpFrontSettings
from services.http_front.stopping import DRAIN_RETRY_AFTER_S, DRAINING, Waiting

log = logging.getLogger("cachemesh.http_front")
_PROPAGATOR = TraceContextTextMapPropagator()
# the header each API names its request id in
_ID_HEADER: dict[Api, str] = {"anthropic": "request-id", "openai": "x-request-id"}


# a whole answer larger than this goes out in writes of this size, each within
# HTTP_FRONT_WRITE_TIMEOUT_S (aiohttp's writer waits for its buffer to drain past 64 KiB)
_WRITE_BYTES = 1 << 16


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
        self._bodies = Bodies(settings, body_budget, metrics)
        self.draining = False
        self._waiting = Waiting(gateway, settings.grace_s)
        self._gateway_ready = CachedVerdict(gateway.serving, monotonic, settings.gateway_addr)
        self._versions = AnthropicVersions(clock)  # its WARNING of a newer version: once a process

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
        its call and answers ``CUT``; how many (``Waiting.cut``)."""
        return self._waiting.cut()

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
            status = request.get(ENDED, response.status)
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
                    request[CALLER_ID] = caller_id
            try:
                tenant, key = await admit(api, request, self._keys, self._versions)
                response = await answer(request, tenant, key, traceparent)
            except ApiError as error:
                span.set_attribute("error.type", error.kind)
                response = await self._failed(api, request, error, traceparent)
                refused = error
            except ConnectionError as exc:
                if STREAM not in request:
                    self._gone(request, name, began)
                    raise
                # the caller went away mid-stream (a write failed), or stopped reading (a write
                # timed out): nothing to answer
                stalled = isinstance(exc, CallerStalled)
                why = str(exc) if stalled else type(exc).__name__
                log.info("%s: the caller went away mid-stream (%s)", name, why)
                span.set_attribute("error.type", "client_stalled" if stalled else "client_gone")
                request[ENDED] = 499  # the caller went away or stopped reading mid-stream
                response = request[STREAM]
            except asyncio.CancelledError:
                # the caller disconnected while its answer was awaited: aiohttp cancels the
                # handler (handler_cancellation), and the call with it. No response goes out;
                # the span says what the metric counts (499), then the cancel goes on.
                span.set_attribute("error.type", "client_gone")
                span.set_attribute("http.response.status_code", 499)
                self._gone(request, name, began)
                raise
            except Exception as exc:  # a bug here: the caller still gets its API's error shape
                log.exception("http-front failed on %s", name)
                span.record_exception(exc)
                why = "the HTTP front failed on this request; see its log"
                answered = bool(request.get(ANSWERED))
                if answered:  # not retried: a retry would be a model call and a bill again
                    why += " (the Gateway had answered it, and billed the answer)"
                failed = ApiError("api", why, final=answered)
                response = await self._failed(api, request, failed, traceparent)
                refused = failed
            if request.get(STALLED) and request.transport is not None:
                # the write still waiting on the caller is dropped with its connection (aiohttp
                # would otherwise wait on it to end the response)
                request.transport.abort()
            if request.get(BODY_CUT) and request.transport is not None:
                await _answer_and_close(request, response)
            # the request's statuses (``_Statuses``): the head's and its verdict before the
            # send, as the caller took it after
            head = response.status
            verdict = request.get(ENDED, head)
            request_id = response.headers.get("x-cachemesh-request-id", "")
            try:
                if not response.prepared:  # a whole answer or refusal: it goes out from here
                    response = await self._send(request, name, response)
            finally:
                # after the send: a caller that did not take it (``_send``: ``ENDED`` 499) has
                # the same status in the span, the metric and the front's access line
                statuses = _Statuses(head, verdict, ended=request.get(ENDED, verdict))
                statuses.mark(span)
                if refused is not None and not request.get(REACHED):  # no router said it had it
                    self._refusals.refused(
                        request.get(TENANT, ""),
                        request_id,
                        name,
                        refused.code,
                        statuses.ended,
                        self._monotonic() - began,
                        gateway_called=bool(request.get(CALLED)),
                    )
            log.debug("%s answered %d", name, response.status)
            return response

    def _gone(self, request: web.Request, name: str, began: float) -> None:
        """The access line of a request whose caller went away (or that the front's stop cut)
        before its Gateway call: its body half sent, its key or its slot still being checked.
        No response went out and no router saw it, so it had no line anywhere, though it held
        its tenant's in-flight slot and body budget: ``CANCELLED``, ``http_status`` 499, as the
        metric counts it. Once the Gateway showed it had the call (``REACHED``), the router's
        line says it (``CANCELLED``); a caller gone after the call began but before that (the
        call cancelled before the router ran it) has this line, ``gateway_replied: false``."""
        if request.get(REACHED):
            return
        self._refusals.refused(
            request.get(TENANT, ""),
            request.get(CALLER_ID, "") or uuid.uuid4().hex,
            name,
            Code.CANCELLED,
            499,
            self._monotonic() - began,
            gateway_called=bool(request.get(CALLED)),
        )

    async def _sent(self, request: web.Request, write: Awaitable[object]) -> None:
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
            request[STALLED] = True
            raise CallerStalled(
                f"the caller read nothing for {self._settings.write_timeout_s:g} s "
                "(HTTP_FRONT_WRITE_TIMEOUT_S)"
            ) from None

    async def _send(
        self, request: web.Request, name: str, response: web.StreamResponse
    ) -> web.StreamResponse:
        """Sends a response that is not a stream (an answer, a refusal) as a stream's events
        go: each write within ``HTTP_FRONT_WRITE_TIMEOUT_S`` (``_sent``), a body over
        ``_WRITE_BYTES`` in writes of that size (the timeout bounds each part's wait, not the
        whole body's: a slow reader of a large answer keeps it). Left to aiohttp, it was
        written with no timeout: a caller that keeps its connection open and never reads an
        answer larger than the socket buffers held its task, its bytes and its connection for
        ever. Such a caller (or one gone meanwhile) has its connection closed and the request
        counts as 499, in its span and in the front's access line (written once this
        returns: the refusal's ``status``, ``http_status`` 499); a router's access line says what
        the router answered. The response sent is returned (a large body's has its own
        object: the same status and headers, its ``Content-Length`` set)."""
        body = response.body if isinstance(response, web.Response) else None
        sent = response
        try:
            if not isinstance(body, bytes) or len(body) <= _WRITE_BYTES or request.method == "HEAD":
                await self._sent(request, response.prepare(request))
                await self._sent(request, response.write_eof())
                return response
            sent = web.StreamResponse(
                status=response.status, reason=response.reason, headers=response.headers
            )
            sent.content_length = len(body)
            if response.keep_alive is False:  # its connection was to close after it
                sent.force_close()
            await self._sent(request, sent.prepare(request))
            whole = memoryview(body)
            for at in range(0, len(body), _WRITE_BYTES):
                await self._sent(request, sent.write(whole[at : at + _WRITE_BYTES]))
            await self._sent(request, sent.write_eof())
        except ConnectionError as exc:
            stalled = isinstance(exc, CallerStalled)
            why = str(exc) if stalled else type(exc).__name__
            log.info("%s: the caller went away before its answer was sent (%s)", name, why)
            span = trace.get_current_span()  # 499 as the metric counts it, not the head's 200
            span.set_attribute("error.type", "client_stalled" if stalled else "client_gone")
            span.set_attribute("http.response.status_code", 499)
            request[ENDED] = 499
            if request.transport is not None:  # what is left of the answer is dropped
                request.transport.abort()
        except asyncio.CancelledError:  # the caller disconnected meanwhile: as in ``_traced``
            trace.get_current_span().set_attribute("error.type", "client_gone")
            request[ENDED] = 499
            raise
        return sent

    async def _failed(
        self, api: Api, request: web.Request, error: ApiError, traceparent: str
    ) -> web.StreamResponse:
        """The error in the API's shape: a response of its own, or, once a stream's head went
        out, an error event at the end of that stream (a second response would write a
        second status line into the body)."""
        stream: web.StreamResponse | None = request.get(STREAM)
        if stream is None:
            return self._error(
                api, error, traceparent, request.get(CALLER_ID, "") or error.request_id
            )
        request[ENDED] = error.status_for(api)
        # the head names the caller's id, or none yet (it went out before the Gateway's start,
        # with pings): then the id the Gateway made up for its refusal
        named = stream.headers.get(_ID_HEADER[api], "") or error.request_id
        body = error.body_for(api, named)
        with contextlib.suppress(ConnectionError, RuntimeError):  # the caller may be gone
            frame = sse.event("error", body) if api == "anthropic" else sse.data(body)
            await self._sent(request, stream.write(frame))
            await self._sent(request, stream.write_eof())
        return stream

    async def sent(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """A response a route returns unsent (a 404 or 405, ``/healthz``, ``/readyz``) sent as
        the model routes' answers are (``_send``: each write within HTTP_FRONT_WRITE_TIMEOUT_S);
        one already sent is returned as it is. Left to aiohttp, with no timeout, a caller that
        pipelined such requests and never read held its connection and its task for ever (its
        socket full, the last write waiting): with HTTP_FRONT_MAX_CONNECTIONS reached, every
        other caller was refused."""
        if response.prepared:
            return response
        return await self._send(request, f"{request.method} {_route(request)}", response)

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

    # --- Anthropic ----------------------------------------------------------------------------
    async def _messages(
        self, request: web.Request, tenant: str, key: str, traceparent: str
    ) -> web.StreamResponse:
        self._take_model_request()
        with self._in_flight.slot(tenant):  # before the body: one still coming holds its slot
            body = await self._bodies.read("anthropic", request, tenant)
            kept: list[anthropic_api.Turn] = []  # where each Gateway message came from
            gw, stream = await self._bodies.translated(
                request,
                tenant,
                partial(
                    anthropic_api.parse_request,
                    body,
                    version=request[ANTHROPIC_VERSION],
                    thinks_by_default=self._settings.thinks_by_default,
                    kept=kept,
                ),
            )
            del body  # not held through the call
            _cache_options(request, gw)
            try:
                return await self._anthropic(
                    request, self._bodies.sized(gw), stream, key, traceparent, kept
                )
            except ApiError as error:
                raise _anthropic_paths(error, kept) from None

    async def _anthropic(
        self,
        request: web.Request,
        gw: pb.CompleteRequest,
        stream: bool,
        key: str,
        traceparent: str,
        kept: Sequence[anthropic_api.Turn],
    ) -> web.StreamResponse:
        request[CALLED] = True
        if not stream:
            end = await self._waiting.complete(gw, key, traceparent, _reached(request))
            request[ANSWERED] = True
            headers = facts.end_headers(end, traceparent)
            headers[_ID_HEADER["anthropic"]] = end.request_id
            return _json(anthropic_api.response(end), headers=headers)
        events = anthropic_api.EventStream()
        ping = sse.event(*anthropic_api.PING)
        # the pacer closes first (its pending read cancelled), then the call: a write that
        # fails while a read is pending must not close the call under it
        async with (
            aclosing(self._gateway.stream(gw, key, traceparent, _reached(request))) as chunks,
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
                error = _anthropic_paths(error, kept)
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
                return await self._openai(
                    request, gw, stream, include_usage, key, traceparent, origins
                )
            except ApiError as error:
                raise _openai_paths(error, origins) from None

    async def _chat_request(
        self, request: web.Request, tenant: str, origins: openai_api.Origins
    ) -> tuple[pb.CompleteRequest, bool, bool]:
        """The Gateway request of a chat completion, its body's JSON dropped (not held through
        the call); ``origins``: where its parts came from in the caller's."""
        body = await self._bodies.read("openai", request, tenant)
        model = body.get("model")
        default = self._settings.default_max_tokens.get(
            model if isinstance(model, str) else "", 1024
        )
        gw, stream, include_usage = await self._bodies.translated(
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
        return self._bodies.sized(gw), stream, include_usage

    async def _openai(
        self,
        request: web.Request,
        gw: pb.CompleteRequest,
        stream: bool,
        include_usage: bool,
        key: str,
        traceparent: str,
        origins: openai_api.Origins,
    ) -> web.StreamResponse:
        created = int(self._clock())
        request[CALLED] = True
        if not stream:
            end = await self._waiting.complete(gw, key, traceparent, _reached(request))
            request[ANSWERED] = True
            headers = facts.end_headers(end, traceparent)
            headers[_ID_HEADER["openai"]] = end.request_id
            return _json(openai_api.response(end, created), headers=headers)
        chunker = openai_api.ChunkStream(created, include_usage)
        async with (
            aclosing(self._gateway.stream(gw, key, traceparent, _reached(request))) as chunks,
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
                # the error's chunk ends the stream, as OpenAI's does (a ``data:`` line of
                # ``{"error": ...}``, then no ``[DONE]``, which says the answer is whole) and
                # as this front's ``_failed`` ends one: before, a ``[DONE]`` followed it here
                error = _openai_paths(error, origins)
                _ended_by(request, "openai", error)
                body = error.body_for("openai", start.start.request_id)
                await self._sent(request, response.write(sse.data(body)))
            else:
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
                request[ANSWERED] = True
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
        request[STREAM] = response  # from here on, an error ends this stream
        return response

    # --- models -------------------------------------------------------------------------------
    async def _models(
        self, request: web.Request, tenant: str, key: str, traceparent: str
    ) -> web.StreamResponse:
        wanted = request.match_info.get("model")
        api: Api = "anthropic" if "anthropic-version" in request.headers else "openai"
        return _json(model_list.listing(api, self._settings.models, wanted))


def _reached(request: web.Request) -> Callable[[], None]:
    """Marks ``request`` ``REACHED`` (the Gateway showed it has the call)."""

    def reached() -> None:
        request[REACHED] = True

    return reached


def _cache_options(request: web.Request, gw: pb.CompleteRequest) -> None:
    """The ``x-cachemesh-*`` headers and ``Idempotency-Key`` on ``gw``; the caller's id kept
    on ``request`` for a refusal's response."""
    facts.cache_options(request.headers, gw)
    if gw.request_id:
        request[CALLER_ID] = gw.request_id


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Sends ``response`` and closes the connection once it has gone out, without reading
    the rest of the request's body."""
    response.force_close()
    with contextlib.suppress(ConnectionError, RuntimeError):  # the caller may be gone
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()


@dataclasses.dataclass(frozen=True, slots=True)
class _Statuses:
    """A request's statuses once its answer went out (``_traced``), for its span, the metric
    and the front's access line."""

    head: int  # as its response's head said it (a stream's 200, whatever ended the stream)
    # the request's: the head's, or the error event's that ended a stream whose head went out
    # (``ENDED``; 499: the caller went away or stopped reading mid-stream)
    verdict: int
    # as the caller took it: the verdict, or 499 when it went away or stopped reading while a
    # whole answer or refusal went out (``_send``), as the metric counts it
    ended: int

    def mark(self, span: trace.Span) -> None:
        """The span's status code as sent, but 499 for a caller gone or stalled, as the metric
        counts it; an ERROR status for the server's failure (a 4xx is the caller's) saying
        why: after a stream's head, and not delivered."""
        span.set_attribute("http.response.status_code", 499 if self.ended == 499 else self.head)
        if self.verdict < 500:
            return
        why = f"HTTP {self.verdict}"
        if self.verdict != self.head:
            why += f" after the {self.head}'s head: the stream ended in its error"
        if self.ended != self.verdict:  # still the server's failure, though none saw it
            why += (
                f", not delivered: the caller went away or stopped reading "
                f"({self.ended}, error.type)"
            )
        span.set_status(trace.Status(trace.StatusCode.ERROR, why))


def _ended_by(request: web.Request, api: Api, error: ApiError) -> None:
    """A stream whose head went out ends in ``error``'s event: its metrics count the error's
    status, not the 200 of its head, and the server span carries the error's kind."""
    request[ENDED] = error.status_for(api)
    trace.get_current_span().set_attribute("error.type", error.kind)


def _anthropic_paths(error: ApiError, kept: Sequence[anthropic_api.Turn]) -> ApiError:
    """A refusal of the Gateway call as the Messages API names fields: the Gateway's paths
    are Chat Completions' form (``messages[1].content[0]``), Anthropic's are dotted
    (``anthropic_api.at_caller``), a message's and a block's index are the caller's
    (``kept``: the empty answers the front dropped are no Gateway message, consecutive turns
    of a role are one), and a role is the caller's ``"role": "user"``; the front's own
    refusals before the call are already so."""
    said = anthropic_api.at_caller(error.message, kept)
    return error if said == error.message else dataclasses.replace(error, message=said)


def _openai_paths(error: ApiError, origins: openai_api.Origins) -> ApiError:
    """A refusal of the Gateway call as the caller named its request: the Gateway's paths
    name its request's messages and fields, not the caller's (``openai_api.at_caller``), in
    every error, an error response or a stream's error event after its start, as the
    Anthropic side's (``_anthropic_paths``); before, only a 400 that came before the stream's
    start was rewritten. The caller's field a 400 names first is OpenAI's ``param`` (none for
    the server's errors, as OpenAI's)."""
    said = openai_api.at_caller(error.message, origins)
    param = error.param
    if error.kind == "invalid_request":
        param = param or openai_api.param_of(said, origins)
    if said == error.message and param == error.param:
        return error
    return dataclasses.replace(error, message=said, param=param)


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
