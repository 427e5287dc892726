"""The drain of the shared bootstrap: a write racing SIGTERM is refused, never cut off.

Once ``stop`` is set the server keeps taking calls for the refusal window (NOT_SERVING), so a
servicer that shares ``stop`` answers a new write with UNAVAILABLE and its reason rather than
gRPC cancelling the call; a call already in flight still finishes within the grace period.
"""

from __future__ import annotations

import asyncio
import socket
from asyncio import FIRST_COMPLETED
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.env import ConfigError, Env
from services.common.server import DRAIN_REFUSAL_S, ServerSettings, ServiceSpec, run_service
from services.tools.stack.ports import free_port

SERVICE = "test.v1.Writes"
REFUSED = "test is draining for shutdown: writes are refused; retry elsewhere"
Context = grpc.aio.ServicerContext[Any, Any]
SLOW_WRITE_S = 30.0  # the deadline of the write in flight as the drain begins


class Writes:
    """A write that is refused once ``draining`` is set; ``b"slow"`` waits for ``release``."""

    def __init__(self, draining: asyncio.Event) -> None:
        self.draining = draining
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, request: bytes, context: Context) -> bytes:
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
        if request == b"slow":
            self.started.set()
            await self.release.wait()
        return b"ok:" + request

    def register(self, server: grpc.aio.Server) -> None:
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            self.write
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Write": handler}),)
        )


def _spec(port: int, writes: Writes, grace_s: float, refusal_s: float) -> ServiceSpec:
    return ServiceSpec(
        name="test",
        settings=ServerSettings(
            f"127.0.0.1:{port}", grace_s=grace_s, max_message_bytes=1 << 20, refusal_s=refusal_s
        ),
        service_names=[SERVICE],
        register=writes.register,
    )


async def _health(channel: grpc.aio.Channel) -> str:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def _serving(channel: grpc.aio.Channel, server: asyncio.Task[None]) -> None:
    """Until the server says SERVING; the server's own error as soon as it has stopped (a
    port it could not bind: that ConfigError, not 200 health checks' "never SERVING")."""
    for _ in range(200):
        if server.done():
            server.result()  # its error, if it failed
            raise AssertionError("the test server stopped before it was SERVING")
        try:
            if await _health(channel) == "SERVING":
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.025)
    raise AssertionError("the test server never became SERVING")


async def _in_servicer(started: asyncio.Event, call: asyncio.Future[Any], within_s: float) -> None:
    """Until ``started`` (the call is in the servicer), for at most ``within_s``; the call's
    own outcome if it ended first (its deadline passed while the process was paused, say),
    not a wait on ``started`` for ever."""
    waiting = asyncio.ensure_future(started.wait())
    try:
        await asyncio.wait({waiting, call}, timeout=within_s, return_when=FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if started.is_set():
        return
    if call.done():
        outcome = call.exception() or call.result()
        raise AssertionError(f"the call ended before it reached the servicer: {outcome!r}")
    raise AssertionError(f"the call was not in the servicer within {within_s} s")


async def test_a_write_after_the_drain_began_is_refused_with_the_reason() -> None:
    port, stop = free_port(), asyncio.Event()
    writes = Writes(stop)
    # a long window, so the calls below land in it however slow the machine; it ends the test
    task = asyncio.create_task(run_service(_spec(port, writes, grace_s=30, refusal_s=2), stop))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await _serving(channel, task)
        write: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{SERVICE}/Write"
        )
        in_flight = asyncio.ensure_future(write(b"slow", timeout=SLOW_WRITE_S))
        await _in_servicer(writes.started, in_flight, SLOW_WRITE_S)

        stop.set()  # what SIGTERM does
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await write(b"new", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == REFUSED  # the servicer's reason, not the transport's
        assert await _health(channel) == "NOT_SERVING"

        writes.release.set()
        assert await in_flight == b"ok:slow"  # the call in flight when the drain began finishes
    await asyncio.wait_for(task, 30)


async def test_no_grace_means_no_window_and_an_immediate_stop() -> None:
    port, stop = free_port(), asyncio.Event()
    # a 30 s window asked for, no grace: the window must not outlast the grace (0), so the
    # stop comes long before the 10 s this waits (a window ignoring the grace would time out)
    task = asyncio.create_task(run_service(_spec(port, Writes(stop), 0, 30.0), stop))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await _serving(channel, task)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_service_stopped_during_its_warm_up_has_no_refusal_window() -> None:
    """A service stopped before it reached SERVING (a SIGTERM during its start-up) waited its
    refusal window all the same (a review's probe: semantic-cache 1 s), though no caller was
    sent to it. Here a 30 s window is asked for: the stop comes at once."""
    port, stop = free_port(), asyncio.Event()
    warming = asyncio.Event()

    async def warmup() -> None:
        warming.set()
        await asyncio.sleep(3600)  # still warming when stopped

    spec = replace(_spec(port, Writes(stop), grace_s=60, refusal_s=30.0), warmup=warmup)
    task = asyncio.create_task(run_service(spec, stop))
    await asyncio.wait_for(warming.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)  # was: 30 s of window


async def test_a_server_that_cannot_listen_is_said_at_once_not_after_its_health_checks() -> None:
    """The port held by a process that answers nothing (a SIGSTOPped one): the server cannot
    bind it and stops with a ConfigError, which ``_serving`` said only as "never became
    SERVING" after 200 health checks sent to the stopped process (25 s here; each up to its
    5 s deadline)."""
    port, stop = free_port(), asyncio.Event()
    with socket.socket() as held:  # listening, never accepting: the kernel answers, not it
        held.bind(("127.0.0.1", port))
        held.listen()
        task = asyncio.create_task(run_service(_spec(port, Writes(stop), 0, 0), stop))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(ConfigError, match="cannot listen there"):
                await asyncio.wait_for(_serving(channel, task), 10)


async def test_a_call_that_ends_before_the_servicer_is_said_not_waited_for_for_ever() -> None:
    """A slow write whose deadline passed before the servicer had it (the process paused past
    it): the test waited for its ``started`` for ever (killed after 11 min; the SIGTERM sent
    to end it only set the in-process server's ``stop``)."""
    ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    ended.set_exception(TimeoutError("Deadline Exceeded"))
    with pytest.raises(AssertionError, match="ended before it reached the servicer"):
        await asyncio.wait_for(_in_servicer(asyncio.Event(), ended, SLOW_WRITE_S), 10)


@pytest.mark.parametrize(("grace", "window"), [("0", 0.0), ("0.25", 0.25), ("10", DRAIN_REFUSAL_S)])
def test_the_refusal_window_is_within_the_grace_period(grace: str, window: float) -> None:
    settings = ServerSettings.from_env(Env({"CACHEMESH_GRACE_S": grace}), "TEST", "127.0.0.1:1")
    assert settings.refusal_window_s == 0.0  # opt-in: a service that refuses nothing stops
    asked = replace(settings, refusal_s=DRAIN_REFUSAL_S)
    assert asked.refusal_window_s == window
