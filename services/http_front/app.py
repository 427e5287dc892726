"""The HTTP front process: builds every object from the environment, then serves HTTP.

SIGTERM drains: readiness turns 503 at once, the listener closes, the connections open are
still served for the first second (each answer closing its connection; a model request is
refused there, before the Gateway, with a retryable 529 / 503: ``Front.draining``), requests
in flight (streams included) may finish within ``CACHEMESH_GRACE_S``; those still running then
are cut (their connections closed, their Gateway calls cancelled) and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from services.common.clock import MonotonicClock
from services.common.env import ConfigError, Env
from services.common.heap import freeze_startup_heap
from services.common.logs import configure_logging
from services.common.metrics import MetricsEndpoint, new_registry
from services.common.server import DRAIN_REFUSAL_S, run_main
from services.common.stop_signals import STOP_SIGNALS, stop_on_signals
from services.common.telemetry import SpanDrops, build_tracer_provider, stop_tracing
from services.common.unread import warn_unread_settings
from services.http_front.access_log import RefusalLog
from services.http_front.connections import AcceptErrors, fit_open_files
from services.http_front.gateway import Gateway
from services.http_front.handlers import Front
from services.http_front.http_server import MAX_FIELD_SIZE, MAX_HEADERS, SERVER, Runner
from services.http_front.limits import BodyBudget, InFlight
from services.http_front.metrics import HttpFrontMetrics
from services.http_front.settings import HttpFrontSettings

# at the end of the grace, how long the non-streaming requests still waiting on the Gateway
# have to answer their refusal (``Front.cut``) before their connections are closed
CUT_ANSWER_S = 1.0
# how often the drain's open window looks whether a connection is still open
OPEN_POLL_S = 0.02
log = logging.getLogger("cachemesh.http_front")


def build_app(front: Front, max_json_bytes: int) -> web.Application:
    @web.middleware
    async def no_route(request: web.Request, handler: Handler) -> web.StreamResponse:
        if isinstance(request.match_info.http_exception, web.HTTPException):
            response: web.StreamResponse = front.no_route(
                request, request.match_info.http_exception
            )
        else:
            response = await handler(request)
        return await front.sent(request, response)  # within the write timeout, whatever route

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER  # not aiohttp's, which names its and Python's version

    # the front reads a body itself, up to ``max_json_bytes`` (``Front._body``); aiohttp's own
    # reads (none today) stop there too
    app = web.Application(client_max_size=max_json_bytes, middlewares=[no_route])
    app.on_response_prepare.append(server_header)
    app.router.add_post("/v1/messages", front.messages)
    app.router.add_post("/v1/chat/completions", front.chat_completions)
    app.router.add_get("/v1/models", front.models)
    app.router.add_get("/v1/models/{model:.+}", front.models)  # ids like org/name
    app.router.add_get("/healthz", front.healthz)
    app.router.add_get("/readyz", front.readyz)
    return app


async def _open_window(runner: Runner, over: asyncio.Future[object], open_s: float) -> None:
    """Waits ``open_s``, less once no connection is open (the listener is closed: no caller is
    left to serve, a stop with none had waited the whole window) or the grace is over."""
    loop = asyncio.get_running_loop()
    end = loop.time() + open_s
    while not over.done() and runner.server is not None and runner.server.connections:
        left = end - loop.time()
        if left <= 0:
            return
        await asyncio.wait({over}, timeout=min(left, OPEN_POLL_S))


async def drain(
    runner: Runner,
    grace: Awaitable[object],
    cut: Callable[[], int] = lambda: 0,
    open_s: float = 0.0,
) -> None:
    """Stops listening, and for ``open_s`` (within the grace, and while any is open) still
    serves the connections already open, each answer saying ``Connection: close``: a request
    sent on an idle keep-alive connection as the drain began is answered, where closing that
    connection at once reset it (the caller cannot tell it was not served); a model request is
    answered its refusal, not started (``Front.draining``, set before this is called). Then
    closes the idle connections and lets the requests in flight finish until ``grace`` is over
    (the end of ``CACHEMESH_GRACE_S``); then ``cut`` has the non-streaming ones still waiting on the
    Gateway (``cut`` says how many) answer their refusal (a closed connection, the SDKs retried
    them: a new model call each), for at most ``CUT_ANSWER_S``, and closes the connections of
    those still running: each handler is cancelled (``handler_cancellation``), and its Gateway
    call with it, which the router bills for what it produced. aiohttp's own shutdown would
    wait its timeout twice, a streaming handler going on in between (the cancel it sends only
    reaches a handler that reads the request's body)."""
    server = runner.server
    over = asyncio.ensure_future(grace)
    try:
        runner.closing = True
        for site in runner.sites:
            await site.stop()  # no new connection; those open are still read
        if open_s > 0:
            await _open_window(runner, over, open_s)
        cleanup = asyncio.ensure_future(runner.cleanup())  # closes the idle connections
        await asyncio.wait({cleanup, over}, return_when=asyncio.FIRST_COMPLETED)
        if not cleanup.done() and cut() > 0:
            await asyncio.wait({cleanup}, timeout=CUT_ANSWER_S)
        if not cleanup.done() and server is not None:
            busy = server.connections
            log.warning(
                "http-front: %d connections still busy at the end of the grace: closed, "
                "their Gateway calls cancelled",
                len(busy),
            )
            for connection in busy:
                connection.force_close()
        await cleanup
    finally:
        over.cancel()


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    lines = configure_logging(Env(environ))
    warn_unread_settings(environ, "http-front")
    settings = HttpFrontSettings.from_env(environ)
    max_connections = fit_open_files(settings.max_connections, settings.max_connections_set)
    keys = settings.keys.open(time.monotonic, time.time)
    provider = build_tracer_provider(environ, "http-front", edge=True)
    clock = MonotonicClock()  # this process's intervals (log throttles, accept errors)
    gateway = Gateway(
        settings.gateway_addr,
        settings.gateway_timeout_s,
        settings.gateway_tls,
        clock=clock,
        max_message_bytes=settings.max_message_bytes,
    )
    registry = new_registry()
    registry.register(SpanDrops(provider))
    metrics = HttpFrontMetrics(registry, time.perf_counter)
    front = Front(
        settings,
        keys,
        gateway,
        InFlight(settings.max_in_flight_per_key),
        provider.get_tracer("cachemesh.http_front"),
        metrics=metrics,
        refusals=RefusalLog(lines),
        body_budget=BodyBudget(
            settings.body_budget_bytes, settings.body_tenant_bytes, metrics.body_bytes
        ),
    )
    endpoint = MetricsEndpoint(settings.metrics, registry, ready=front.ready)
    runner = Runner(
        build_app(front, settings.max_json_bytes),
        max_connections=max_connections,
        write_timeout_s=settings.write_timeout_s,
        clock=clock,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,  # a caller that disconnects cancels its Gateway call
        shutdown_timeout=settings.grace_s,
        # also the deadline for a request's headers: aiohttp's default held a connection that
        # never finished them for an hour
        keepalive_timeout=settings.idle_timeout_s,
        max_headers=MAX_HEADERS,
        max_field_size=MAX_FIELD_SIZE,
    )
    accept_errors = AcceptErrors(clock)
    await runner.setup()
    host, _, port = settings.listen.rpartition(":")
    ssl_context = settings.tls.ssl_context() if settings.tls is not None else None
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=ssl_context)
    try:
        await site.start()
        await endpoint.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"HTTP_FRONT_LISTEN={settings.listen}: cannot listen ({exc})") from None
    except ConfigError:
        await runner.cleanup()
        raise
    log.info(
        "http-front listening on %s (%s), Gateway at %s (%s), metrics on %s",
        settings.listen,
        "plaintext" if settings.tls is None else settings.tls.describe(),
        settings.gateway_addr,
        "plaintext" if settings.gateway_tls is None else "TLS",
        settings.metrics.listen,
    )
    log.info("http-front: %d start-up objects frozen (gc.freeze)", freeze_startup_heap())
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    accept_errors.install(loop)
    stop_on_signals(loop, stop)  # a second signal ends the process at once
    # stopped (a signal during the start-up) before it listened: no caller was sent to it, no
    # connection of one to serve in an open window
    stopped_at_start = stop.is_set()
    try:
        await stop.wait()
        front.draining = True  # readiness 503; a model request refused, not started
        log.info("http-front draining: grace %.1fs", settings.grace_s)
        # stops listening, still serves the connections open for the refusal window (each
        # answer closing its connection), waits for requests in flight until the grace is over
        open_s = 0.0 if stopped_at_start else min(DRAIN_REFUSAL_S, settings.grace_s)
        await drain(runner, asyncio.sleep(settings.grace_s), front.cut, open_s)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        accept_errors.uninstall()
        await gateway.close()
        await endpoint.stop()
        await stop_tracing(provider)  # last: bounded, whatever the collector does
        log.info("http-front stopped")


def main() -> None:
    run_main("http-front", serve)
