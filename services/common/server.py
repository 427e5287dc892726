"""Bootstrap shared by every service: grpc.aio server, health, reflection, SIGTERM drain.

A service builds its objects in its own ``serve()`` and hands them here as a ``ServiceSpec``;
nothing lives in module state. Health reports NOT_SERVING until ``warmup`` has finished (for
example until the embedding model is loaded) and again as soon as a drain begins.

A drain (SIGTERM, SIGINT or ``stop``) has two phases, both within ``CACHEMESH_GRACE_S``:

1. Refusal window (``refusal_s``, at most the grace; 0 unless the service asks for it):
   ``stop`` is set (a servicer that shares it, like semantic-cache's, refuses writes with
   UNAVAILABLE and a message saying so), health says NOT_SERVING, and the server still takes
   calls. A call racing the signal thus reaches the
   servicer and gets its answer, instead of being cut off by gRPC with CANCELLED.
2. ``server.stop`` with the rest of the grace: no new calls, in-flight calls may finish.
   At its end gRPC cancels the calls left; the spec's ``GraceEnd`` is set just before, so
   they are recorded as the server cut them (UNAVAILABLE, what their callers see), not as a
   caller's cancel.

A service stopped before it reached SERVING (during its warm-up) has no refusal window: no
caller was sent to it. A second SIGTERM or SIGINT, during the start-up, the drain or the last
steps, ends the process at once by the signal's default action (exit 143 / 130;
``stop_signals.stop_on_signals``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.channels import server_options
from services.common.connections import ConnectionPolicy
from services.common.env import C_INT_MAX, ConfigError, Env, address_error
from services.common.grace import GraceEnd
from services.common.heap import freeze_startup_heap
from services.common.metrics import MetricsEndpoint
from services.common.stop_signals import STOP_SIGNALS, release_stop_signals, stop_on_signals
from services.common.tls import ServerTls
from services.common.tokens import tokenizer_error_exits
from services.common.wire import MalformedRequests

log = logging.getLogger("cachemesh.server")

MAX_MESSAGE_BYTES_DEFAULT = 4 * 1024 * 1024
# The first part of the grace period during which a draining server still takes calls (to
# refuse them with a reason), for a service whose servicer refuses writes while draining
# (semantic-cache); the others stop taking calls at once. Not a setting of its own: it is
# bounded by CACHEMESH_GRACE_S, so CACHEMESH_GRACE_S=0 stops at once and a drain never
# outlasts the grace period.
DRAIN_REFUSAL_S = 1.0


@dataclass(frozen=True)
class ServerSettings:
    listen: str
    grace_s: float
    max_message_bytes: int  # the largest message received (and sent, unless max_send_bytes)
    refusal_s: float = 0.0  # the refusal window, capped at grace_s (DRAIN_REFUSAL_S to refuse)
    tls: ServerTls | None = None  # None = plaintext (the internal services on loopback)
    listen_name: str = "the listen address"  # the variable ``listen`` came from, for errors
    max_send_bytes: int | None = None  # the largest message sent; None: max_message_bytes
    # a public server's limits and keepalive per client connection; None: an internal one's
    connections: ConnectionPolicy | None = None

    @property
    def send_limit(self) -> int:
        return self.max_message_bytes if self.max_send_bytes is None else self.max_send_bytes

    @property
    def refusal_window_s(self) -> float:
        return max(0.0, min(self.refusal_s, self.grace_s))

    @classmethod
    def from_env(cls, env: Env, prefix: str, default_listen: str) -> ServerSettings:
        return cls(
            listen=env.address(f"{prefix}_LISTEN", default_listen),
            grace_s=env.seconds("CACHEMESH_GRACE_S", 10.0, minimum=0.0),
            max_message_bytes=max_message_bytes(env),
            listen_name=f"{prefix}_LISTEN",
        )


# The Gateway takes requests of at most this share of CACHEMESH_MAX_MESSAGE_BYTES (its
# ROUTER_MAX_REQUEST_BYTES): each call that passes a request on carries it beside fields of
# its own, and prefix-cache's Plan answers with the prompt's KV block hashes, 2 bytes a token.
REQUEST_SHARE = 2  # at most 1/2
# The Gateway's gRPC transport reads requests up to this many times ROUTER_MAX_REQUEST_BYTES
# (and at most CACHEMESH_MAX_MESSAGE_BYTES, every service's limit): the router refuses
# one over its limit itself, RESOURCE_EXHAUSTED naming the setting, counted and logged; only
# a larger one gets gRPC's own "Received message larger than max", before the router's code.
REQUEST_READ_SHARE = 2
# 2 MiB: a 200k-token prompt of ordinary text fits with room (cl100k, measured on
# ../shared/data and this repository: tau-bench conversations 3.78 bytes a token, tool
# schemas 3.85-4.12, Python 4.12, Markdown 3.73, prose 4.90: 0.75 to 0.98 MB); 1 MiB held
# no text over 5.24 bytes a token (a 1.19 MB prompt of 136k tokens was refused).
DEFAULT_REQUEST_BYTES = 2 * 1024 * 1024


def default_request_bytes(max_message_bytes: int) -> int:
    """The largest request the Gateway takes by default (ROUTER_MAX_REQUEST_BYTES unset; the
    HTTP front's body limit follows it): 2 MiB, or the message limit's share when lower."""
    return min(DEFAULT_REQUEST_BYTES, max_message_bytes // REQUEST_SHARE)


def max_message_bytes(env: Env) -> int:
    """CACHEMESH_MAX_MESSAGE_BYTES: the largest gRPC message a service sends or receives."""
    return env.int(
        "CACHEMESH_MAX_MESSAGE_BYTES",
        MAX_MESSAGE_BYTES_DEFAULT,
        minimum=1024,
        maximum=C_INT_MAX,  # gRPC's limit is a C int
    )


class HealthSwitch:
    """Lets a running service report NOT_SERVING (and SERVING again) for a reason of its own,
    such as a provider refusing its credentials. Bound by ``run_service``; a drain wins."""

    def __init__(self) -> None:
        self._servicer: health.aio.HealthServicer | None = None
        self._names: tuple[str, ...] = ()
        self._ready = False
        self.serving = True  # what the service wants, once warm

    def _bind(self, servicer: health.aio.HealthServicer, names: Sequence[str]) -> None:
        self._servicer = servicer
        self._names = ("", *names)

    async def _warm(self) -> None:
        self._ready = True
        await self._apply()

    async def set(self, serving: bool) -> None:
        self.serving = serving
        if self._ready:
            await self._apply()

    async def _apply(self) -> None:
        if self._servicer is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._servicer.set(name, status)


class _Health(health.aio.HealthServicer):
    """grpc.health.v1, whose overall status (service "") the metrics port's ``GET /readyz``
    answers too: in plaintext, for a health check without the TLS port's credentials."""

    def __init__(self) -> None:
        super().__init__()
        self._serving = False
        self._draining = False

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if service == "" and not self._draining:
            self._serving = status == health_pb2.HealthCheckResponse.SERVING

    async def enter_graceful_shutdown(self) -> None:
        self._draining, self._serving = True, False
        await super().enter_graceful_shutdown()

    async def serving(self) -> bool:
        return self._serving


@dataclass
class ServiceSpec:
    name: str  # e.g. "semantic-cache", for logs
    settings: ServerSettings
    service_names: Sequence[str]  # full proto names, e.g. "cachemesh.v1.SemanticCache"
    register: Callable[[grpc.aio.Server], None]
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    warmup: Callable[[], Awaitable[None]] | None = None
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    health: HealthSwitch | None = None  # the service's own say on its health, after warm-up
    metrics: MetricsEndpoint | None = None  # GET /metrics, served while the service runs
    # told the method (full name) of each request refused as malformed, before any servicer
    malformed: Callable[[str], None] | None = None
    # set when the drain's grace ends, before gRPC cancels the calls left (None: not told)
    grace_end: GraceEnd | None = None


def grpc_server_options(settings: ServerSettings) -> list[tuple[str, int | str]]:
    """The options a service's gRPC server is made with."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.send_limit),
        *server_options(settings.connections),
    ]


async def run_service(spec: ServiceSpec, stop: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop`` is set), then drains within the grace period."""
    stop = stop or asyncio.Event()
    options = grpc_server_options(spec.settings)
    # malformed requests are refused first: before tracing, authentication or a servicer
    interceptors = [MalformedRequests(spec.malformed), *spec.interceptors]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    spec.register(server)
    health_servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*spec.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)

    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *spec.service_names):
        await health_servicer.set(name, not_serving)
    tls = spec.settings.tls
    wrong = address_error(spec.settings.listen)
    if wrong:  # its form, before a bind failure is blamed on the port or the machine
        raise ConfigError(
            f"{spec.settings.listen_name}={spec.settings.listen[:80]!r}: {spec.name} cannot "
            f"listen there: it must be host:port (e.g. 127.0.0.1:50051, [::]:50051): {wrong}"
        )
    try:
        if tls is not None:
            port = server.add_secure_port(spec.settings.listen, tls.grpc_credentials())
        else:
            port = server.add_insecure_port(spec.settings.listen)
    except RuntimeError:  # grpcio raises on a port in use (older releases returned 0)
        port = 0
    if port == 0:
        raise ConfigError(
            f"{spec.settings.listen_name}={spec.settings.listen}: {spec.name} cannot listen "
            "there (the port is in use, or the address is not this machine's)"
        )
    if spec.metrics is not None:
        if spec.metrics.ready is None:  # GET /readyz in plaintext, whatever the port speaks
            spec.metrics.ready = health_servicer.serving
        await spec.metrics.start()  # a port already held stops the start-up, naming it
    await server.start()
    log.info(
        "%s listening on %s (%s; NOT_SERVING until ready), metrics on %s",
        spec.name,
        spec.settings.listen,
        "plaintext" if tls is None else tls.describe(),
        spec.metrics.settings.listen if spec.metrics is not None else "(none)",
    )

    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)  # a second signal ends the process at once
    served = False  # reached SERVING (its own health aside): calls may have been sent to it
    try:
        if spec.warmup is not None:
            warm = asyncio.ensure_future(spec.warmup())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({warm, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not warm.done():
                warm.cancel()
            else:
                stopped.cancel()
                if warm.exception() is not None:
                    # a failed warm-up stops the process with its error, server closed first
                    await server.stop(0)
                    warm.result()
        if not stop.is_set():
            # before SERVING: the full passes of the cyclic GC skip the start-up heap from now on
            log.info("%s: %d start-up objects frozen (gc.freeze)", spec.name, freeze_startup_heap())
            if spec.health is not None:
                spec.health._bind(health_servicer, spec.service_names)
                await spec.health._warm()
            else:
                for name in ("", *spec.service_names):
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            served = True
            if spec.health is None or spec.health.serving:
                log.info("%s SERVING", spec.name)
            else:  # its own health is down (a WARNING above says why): say what checks see
                log.warning(
                    "%s started, NOT_SERVING: its own health check fails (see the warning "
                    "above); SERVING once it passes",
                    spec.name,
                )
            await stop.wait()
        await _drain(spec, server, health_servicer, served)
    finally:
        try:
            await run_every(spec.on_stop, f"{spec.name} stop")
        finally:
            if spec.metrics is not None:
                await spec.metrics.stop()
            # after the last steps: a second signal during them ends the process too
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
        log.info("%s stopped", spec.name)


async def run_every(steps: Sequence[Callable[[], Awaitable[object]]], what: str) -> None:
    """Runs every step, in order, even after one failed (a later one may be what keeps data:
    a last flush, a last save); each failure is logged, the first is raised at the end."""
    first: Exception | None = None
    for step in steps:
        try:
            await step()
        except Exception as exc:
            log.error("%s: %s failed: %s", what, getattr(step, "__name__", step), exc, exc_info=exc)
            first = first or exc
    if first is not None:
        raise first


async def _drain(
    spec: ServiceSpec,
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    served: bool,
) -> None:
    """``stop`` is set (writes are refused): NOT_SERVING, the refusal window (none for a
    service stopped before it reached SERVING: no caller was sent to it), then stop."""
    settings = spec.settings
    window = settings.refusal_window_s if served else 0.0
    log.info(
        "%s draining: NOT_SERVING, still answering (refusing writes) for %.1fs%s, grace %.1fs",
        spec.name,
        window,
        "" if served else " (stopped before SERVING)",
        settings.grace_s,
    )
    await health_servicer.enter_graceful_shutdown()
    if window > 0:
        # Still taking calls: one that raced the signal reaches the servicer and is refused
        # with UNAVAILABLE (and why) rather than CANCELLED by a server that has stopped.
        await asyncio.sleep(window)
    remaining = max(0.0, settings.grace_s - window)
    await _stop(server, remaining, spec.grace_end)  # in-flight calls may finish


async def _stop(server: grpc.aio.Server, grace_s: float, grace_end: GraceEnd | None) -> None:
    """``server.stop(grace_s)``, with ``grace_end`` set as the grace ends: on the event
    loop's clock, which gRPC's own timeout runs on, at a time no later than gRPC's (its
    timeout starts after this one), so before it cancels the calls left."""
    if grace_end is None:
        await server.stop(grace_s)
        return
    if grace_s <= 0:
        grace_end.end()  # gRPC cancels every call left at once
        await server.stop(grace_s)
        return
    marked = asyncio.get_running_loop().call_later(grace_s, grace_end.end)
    try:
        await server.stop(grace_s)
    finally:
        marked.cancel()  # every call ended within the grace: none was cut


def run_main(
    name: str,
    serve: Callable[[Mapping[str, str], asyncio.Event], Coroutine[Any, Any, None]],
) -> None:
    """A service's ``main``: serve until stopped; a bad configuration or a missing vocabulary
    is one line and exit 2."""
    try:
        with tokenizer_error_exits(name):  # a vocabulary missing: what to do, exit 2
            asyncio.run(_serve_until_stopped(serve, os.environ))
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve_until_stopped(
    serve: Callable[[Mapping[str, str], asyncio.Event], Coroutine[Any, Any, None]],
    environ: Mapping[str, str],
) -> None:
    """``serve`` with a ``stop`` that SIGTERM and SIGINT set from the loop's first turn: one
    sent while the service builds its objects (the router's tokenizers and models, ~1.6 s)
    drains it once it is up (exit 0), where it was killed (143); a second one ends it at once
    (143 / 130: a start that hangs). The signals held back since the process began
    (``hold_stop_signals``, the service's ``__main__``) are delivered now."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)  # a second signal ends the process (a start that hangs)
    release_stop_signals()
    try:
        await serve(environ, stop)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)  # run_service's own may have gone already
