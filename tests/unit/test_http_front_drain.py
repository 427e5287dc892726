"""The HTTP front's drain is bounded by its grace: a stream still running when the grace is over
is cut (its handler cancelled, so its Gateway call is), and the drain ends, whatever aiohttp's
own shutdown timeout. aiohttp alone waited that timeout twice, the stream still flowing."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web

from services.http_front.app import drain
from services.http_front.http_server import Runner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_stream_still_running_at_the_end_of_the_grace_is_cancelled() -> None:
    cancelled = asyncio.Event()
    finished = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        await reply.prepare(request)
        await reply.write(b"data: first\n\n")
        try:
            while True:  # never reads the request's body: aiohttp's own cancel misses it
                await asyncio.sleep(0.01)
                await reply.write(b": ping\n\n")
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def short(request: web.Request) -> web.StreamResponse:
        await finished.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/endless", endless)
    app.router.add_get("/short", short)
    # aiohttp's own timeout far past the grace: only the grace may end the drain
    runner = Runner(
        app,
        max_connections=100,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=3600,
    )
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    grace = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        stream = await session.get(f"http://127.0.0.1:{port}/endless")
        assert await stream.content.readline() == b"data: first\n"
        quick = asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/short"))
        await asyncio.sleep(0.05)  # both in flight
        drained = asyncio.ensure_future(drain(runner, grace.wait()))
        await asyncio.sleep(0.1)
        assert not drained.done()  # within the grace, requests in flight may finish
        finished.set()
        answer = await quick
        assert answer.status == 200 and await answer.text() == "done"
        assert not cancelled.is_set()
        grace.set()  # the grace is over: the stream still running is cut
        await asyncio.wait_for(drained, 30)
        assert cancelled.is_set()
        stream.close()
