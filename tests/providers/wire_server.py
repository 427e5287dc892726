"""Loopback HTTP servers that speak the providers' APIs as their docs show them, for the
official SDKs to talk to unchanged but for the base URL.

One aiohttp server in a thread of the test process serves ``POST /v1/messages`` (Anthropic)
and ``POST /v1/chat/completions`` (OpenAI). Each request is recorded (path, headers, JSON
body, arrival time). Every answer, a stream or an error, carries the provider's request id
header as the real APIs send it (Anthropic's ``request-id``, OpenAI's ``x-request-id``: a
fresh id each, recorded in ``Seen.request_id``; a ``Reply``'s own header of that name wins).
The answer is the next scripted ``Reply`` for that API (and credential,
when the script names one), else the API's default answer; a credential in ``rejected``
always gets the provider's 401 body, and a request an API's ``check`` refuses (as the real API
validates a request before it answers: Anthropic's ``anthropic-version`` rules) gets that
refusal, before any scripted reply is taken.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from services.tools.stack.ports import free_port

Event = tuple[str | None, str]  # (SSE event name or None, data line)
# the response header that names the provider's id of a request, by API
REQUEST_ID_HEADERS = {"anthropic": "request-id", "openai": "x-request-id"}


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # a JSON error body (status >= 400)
    events: list[Event] = field(default_factory=list)  # an SSE stream (status 200)
    cut: bool = False  # drop the connection after the events (no proper end)
    # event index -> the seconds the server waits before sending it (else 2 ms): a slow engine
    pauses: dict[int, float] = field(default_factory=dict)
    hang: bool = False  # never answer
    # with ``hang``: answer (a 503) after these seconds if the client is still there (None:
    # never); a call its client cuts sooner shows ``ended`` and not ``outwaited``
    hang_s: float | None = None
    key: str | None = None  # only for a request carrying this credential


@dataclass
class Seen:
    api: str  # "anthropic" | "openai"
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    key: str
    status: int = 0
    ended: float | None = None  # a hung request: when the client went away
    outwaited: bool = False  # a hung request the client stayed for until its ``hang_s``
    sent: int = 0  # the stream's events written (fewer than scripted: the client went away)
    request_id: str = ""  # the provider's id of the request, sent in its header


Default = Callable[[dict[str, Any]], Reply]
# (headers, lower-cased; body) -> the API's refusal of that request, or None: it is answered
Check = Callable[[dict[str, str], dict[str, Any]], Reply | None]


class WireServer:
    def __init__(
        self,
        defaults: dict[str, Default],
        rejected: dict[str, Reply],
        checks: dict[str, Check] | None = None,
        *,
        shared: bool = False,
    ) -> None:
        """``defaults``: api -> the default answer to a body; ``rejected``: api -> the 401
        reply for a credential in ``self.rejected_keys``; ``checks``: api -> its validation of
        a request (``anthropic_wire.refusal``); ``shared``: the server outlives one test (the
        session's provider stack), so no test may clear what others recorded (``reset``)."""
        self.shared = shared
        self._defaults = defaults
        self._rejected = rejected
        self._checks = checks or {}
        self.rejected_keys: set[str] = set()
        self.scripts: dict[str, list[Reply]] = {"anthropic": [], "openai": []}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port = 0

    # --- the test's side ------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, api: str, *replies: Reply) -> None:
        with self._lock:
            self.scripts[api].extend(replies)

    def pending(self, api: str) -> list[Reply]:
        """The scripted replies of ``api`` not yet taken."""
        with self._lock:
            return list(self.scripts[api])

    def seen_by(self, api: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.api == api]

    def reset(self) -> None:
        """Forget every recorded call and scripted reply: only on a server one test module
        owns. A shared server's record is the session's (the revoked-key test counts every
        call its key ever made): a test finds its own calls by its question instead."""
        if self.shared:
            raise RuntimeError(
                "this loopback server is shared by the session's tests: find your calls in "
                "seen_by() by your request's text instead of clearing what others recorded"
            )
        with self._lock:
            self.seen.clear()
            for queue in self.scripts.values():
                queue.clear()

    def start(self) -> None:
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the loopback provider server did not start")

    def stop(self) -> None:
        async def close() -> None:
            self._stopping.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    # --- the server's side ----------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/messages", self._handler("anthropic"))
        app.router.add_post("/v1/chat/completions", self._handler("openai"))
        self._runner = web.AppRunner(app, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        self.port = free_port()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        ready.set()
        self._loop.run_forever()

    def _handler(self, api: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            headers = {k.lower(): v for k, v in request.headers.items()}
            key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix(
                "Bearer "
            )
            seen = Seen(api, headers, body, time.monotonic(), key)
            with self._lock:
                self.seen.append(seen)
                reply = self._pick(api, key, headers, body)
            seen.status = reply.status
            header = REQUEST_ID_HEADERS[api]
            seen.request_id = reply.headers.get(header, f"req_{uuid.uuid4().hex}")
            return await self._answer(request, reply, seen, {header: seen.request_id})

        return handle

    def _pick(self, api: str, key: str, headers: dict[str, str], body: dict[str, Any]) -> Reply:
        if key in self.rejected_keys:
            return self._rejected[api]
        check = self._checks.get(api)
        if check is not None and (refused := check(headers, body)) is not None:
            return refused
        queue = self.scripts[api]
        for index, reply in enumerate(queue):
            if reply.key is None or reply.key == key:
                return queue.pop(index)
        return self._defaults[api](body)

    async def _answer(
        self, request: web.Request, reply: Reply, seen: Seen, ids: dict[str, str]
    ) -> web.StreamResponse:
        if reply.hang:
            try:  # cancelled when the client goes away
                await asyncio.wait_for(self._stopping.wait(), reply.hang_s)
            except TimeoutError:
                seen.outwaited = True
            finally:
                seen.ended = time.monotonic()
            return web.Response(status=503)
        if reply.status >= 400:
            headers = {**ids, **reply.headers}
            return web.json_response(reply.body, status=reply.status, headers=headers)
        response = web.StreamResponse(
            status=200,
            headers={
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                **ids,
                **reply.headers,
            },
        )
        await response.prepare(request)
        for index, (name, data) in enumerate(reply.events):
            if index in reply.pauses:
                await asyncio.sleep(reply.pauses[index])
            line = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
            await response.write(line.encode())
            seen.sent = index + 1
            await asyncio.sleep(0.002)  # a stream, not one write
        if reply.cut:
            transport = request.transport
            if transport is not None:
                transport.abort()  # mid-stream: no message_stop / [DONE]
            return response
        await response.write_eof()
        return response


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
