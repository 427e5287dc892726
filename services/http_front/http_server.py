"""aiohttp's app runner, but a request its HTTP parser refuses (a control byte in a header, a
line over the size limit, a broken request line) is answered and logged without its bytes.

aiohttp's own answer to such a request logs the parser's message, which quotes the offending
line (an ``x-api-key`` or ``Authorization`` header, key and all), at ERROR with a traceback,
and sends the same message back as the 400's body. Here the log line and the body name only
the kind of fault."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, cast

from aiohttp import hdrs, web, web_protocol
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_request import BaseRequest

from services.common.clock import Clock, SystemClock, Throttle, suppressed

log = logging.getLogger("cachemesh.http_front")

# what every response says of the server (aiohttp's default names Python's and its own version)
SERVER = "cachemesh"
# the parser's bounds on a request's head: an API client sends a dozen short headers. aiohttp's
# defaults (128 headers of 8,190 bytes) let a connection hold ~1 MB of unfinished headers.
MAX_HEADERS = 48
MAX_FIELD_SIZE = 4096
FULL_LOG_EVERY_MS = 10_000
_FULL_TEXT = b"503 Service Unavailable: the front has all the connections it takes open; retry\n"
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nServer: " + SERVER.encode() + b"\r\n"
    b"Content-Length: " + str(len(_FULL_TEXT)).encode() + b"\r\n\r\n" + _FULL_TEXT
)

# the kind of each parser fault, in words that hold none of the request's bytes
_KINDS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "a request line or header longer than the limit"),
    (InvalidHeader, "a malformed header"),
    (BadHttpMethod, "a malformed method (or TLS sent to the plain-HTTP port)"),
    (BadStatusLine, "a malformed request line"),
    (InvalidURLError, "a malformed URL"),
)
_ANY = "a malformed request line or header (e.g. a control character in a header value)"


def fault_kind(exc: HttpProcessingError, max_headers: int = MAX_HEADERS) -> str:
    if type(exc) is BadHttpMessage and "too many headers" in exc.message.lower():
        return f"more than {max_headers} headers"
    return next((kind for cls, kind in _KINDS if isinstance(exc, cls)), _ANY)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _Handler(web_protocol.RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # not the parser's: aiohttp's own answer
            answer = super().handle_error(request, status, exc, message)
            answer.headers["Server"] = SERVER
            return answer
        kind = fault_kind(exc, self.max_headers)
        log.warning(
            "the HTTP parser refused a request from %s: %s (%s, %d); its bytes are not logged",
            request.remote,
            kind,
            type(exc).__name__,
            status,
        )
        response = web.Response(
            status=status,
            text=f"{status} {_phrase(status)}: the request is not valid HTTP/1.1: {kind}\n",
            content_type="text/plain",
            headers={"Server": SERVER},
        )
        response.force_close()
        return response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = cast(_Server, self._manager)
        self._flush_s = server.write_timeout_s
        if not server.takes_one_more():
            # not counted, no task: its connection_lost finds no manager and does nothing
            self._manager = None
            self._force_close = True
            cast(asyncio.Transport, transport).write(_FULL)
            transport.close()  # after the 503 has gone out
            _bound_close(cast(asyncio.Transport, transport), self._flush_s)
            return
        super().connection_made(transport)

    async def start(self) -> None:
        """aiohttp's request loop, then the close it ends with bounded: ``_bound_close``."""
        transport = self.transport
        try:
            await super().start()
        finally:
            if transport is not None:
                _bound_close(transport, self._flush_s)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's own answers (the parser's 400, a 500 or 504 of its own) within
        ``HTTP_FRONT_WRITE_TIMEOUT_S``, as the front's are (``Front._send``, whose answers reach
        here sent already); one the caller does not take in time drops its connection, as if
        it had gone (aiohttp's ``reset``). aiohttp wrote them with no timeout: a caller whose
        unread answers had filled the buffers held the task and its connection for ever."""
        try:
            async with asyncio.timeout(self._flush_s):
                return await super().finish_response(request, resp, start_time)
        except TimeoutError:
            log.info(
                "http-front: the caller read nothing for %g s (HTTP_FRONT_WRITE_TIMEOUT_S) of "
                "an answer of %d: its connection is closed",
                self._flush_s,
                resp.status,
            )
            if self.transport is not None:
                self.transport.abort()
            return resp, True


def _bound_close(transport: asyncio.Transport, flush_s: float) -> None:
    """A connection closed (by aiohttp: after an answer that closes it, at the idle timeout,
    at the end of its request loop) with bytes still unsent is aborted if they have not gone
    out within ``flush_s``. asyncio closes the socket only once its buffer is sent, with no
    bound: a caller that had pipelined requests and read none of their answers (each write
    went into that buffer in time, so no write timed out) held the connection, and its place
    in ``HTTP_FRONT_MAX_CONNECTIONS``, for ever."""
    if transport.is_closing() and transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(flush_s, _abort_if_unsent, transport)


def _abort_if_unsent(transport: asyncio.Transport) -> None:
    """Aborts ``transport`` if bytes are still unsent; one whose caller read them in time has
    closed by now, and asyncio's ``abort`` of a closed selector transport is not a no-op: it
    raises in the loop's callback (an ERROR traceback for a caller that did nothing wrong)."""
    if transport.get_write_buffer_size():
        transport.abort()


class _Server(web.Server):
    """aiohttp's server, its connections handled by ``_Handler``; at most ``max_connections``
    open at once (``HTTP_FRONT_MAX_CONNECTIONS``)."""

    max_connections: int
    write_timeout_s: float  # HTTP_FRONT_WRITE_TIMEOUT_S: aiohttp's own writes, a close's flush
    _full: Throttle

    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def takes_one_more(self) -> bool:
        open_now = len(self._connections)
        if open_now < self.max_connections:
            return True
        refused = self._full.due()
        if refused:
            log.warning(
                "http-front: a new connection answered 503 and closed: %d open, at "
                "HTTP_FRONT_MAX_CONNECTIONS (%d)%s",
                open_now,
                self.max_connections,
                suppressed(refused, FULL_LOG_EVERY_MS),
            )
        return False


class Runner(web.AppRunner):
    """``max_connections``: connections open at once, one more is answered 503 and closed;
    ``write_timeout_s``: each of aiohttp's own answers, and a closed connection's unsent bytes,
    go out within it (HTTP_FRONT_WRITE_TIMEOUT_S), else the connection is dropped; ``clock``:
    times the warning that says so (one an interval). Once ``closing`` (a drain
    has begun), every answer says ``Connection: close`` and its connection closes after it."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        write_timeout_s: float,
        clock: Clock | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._write_timeout_s = write_timeout_s
        self._clock = clock if clock is not None else SystemClock()
        self.closing = False
        app.on_response_prepare.append(self._close_when_closing)

    async def _close_when_closing(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.closing:
            response.force_close()  # the connection closes once this answer is sent
            response.headers[hdrs.CONNECTION] = "close"  # and the caller is told so

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server, its connections handled by _Handler
        assert isinstance(server, _Server)
        server.max_connections = self._max_connections
        server.write_timeout_s = self._write_timeout_s
        server._full = Throttle(self._clock, FULL_LOG_EVERY_MS)
        return server
