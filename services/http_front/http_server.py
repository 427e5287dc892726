"""aiohttp's app runner, but a request its HTTP parser refuses (a control byte in a header, a
line over the size limit, a broken request line) is answered and logged without its bytes.

aiohttp's own answer to such a request logs the parser's message, which quotes the offending
line (an ``x-api-key`` or ``Authorization`` header, key and all), at ERROR with a traceback,
and sends the same message back as the 400's body. Here the log line and the body name only
the kind of fault."""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_request import BaseRequest

log = logging.getLogger("cachemesh.http_front")

# the kind of each parser fault, in words that hold none of the request's bytes
_KINDS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "a request line or header longer than the limit"),
    (InvalidHeader, "a malformed header"),
    (BadHttpMethod, "a malformed method (or TLS sent to the plain-HTTP port)"),
    (BadStatusLine, "a malformed request line"),
    (InvalidURLError, "a malformed URL"),
)
_ANY = "a malformed request line or header (e.g. a control character in a header value)"


def fault_kind(exc: HttpProcessingError) -> str:
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
            return super().handle_error(request, status, exc, message)
        kind = fault_kind(exc)
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
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server, its connections handled by _Handler
        return server
