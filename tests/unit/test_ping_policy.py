"""The Gateway's ping policy against this project's own clients, on real gRPC connections.

A relay between client and server reads the HTTP/2 frames: it counts the client's PINGs and
records any GOAWAY the server sends. The Gateway's server options (``grpc_server_options`` of
the router's settings) face the HTTP front's channel options with both intervals scaled down
alike: the client's keepalive 1 s instead of 10 s (gRPC's clients ping at most every second
without data, so no shorter), the least interval the server accepts a tenth of it, as in
production. Busy calls with large answers (BDP probe pings), then a connection quiet but for
one stream that sends nothing (a model still thinking), or idle, while the event loop is kept
busy: no GOAWAY. (With the server's interval under the key gRPC ignores, its default of 5 min
applied and the fourth quiet ping earned GOAWAY.) A client pinging in a tight loop
(hand-written HTTP/2) is still cut off with GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import grpc
import pytest

from services.common.channels import KEEPALIVE_TIME_MS, MIN_PING_INTERVAL_MS, channel_options
from services.common.connections import ConnectionPolicy
from services.common.env import Env
from services.common.models import load_model_table
from services.common.server import ServerSettings, grpc_server_options
from services.router.settings import RouterSettings
from tests.unit.http2_relay import (
    ENHANCE_YOUR_CALM,
    GOAWAY,
    PING,
    PREFACE,
    SETTINGS,
    Frames,
    Relay,
    frame,
    frames,
)

KEEPALIVE_MS = 1000  # the client's keepalive in these tests (the front's: KEEPALIVE_TIME_MS)
QUIET_PINGS = 8  # keepalive pings seen while the connection is quiet (twice what a GOAWAY took)

BASE = {
    "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
    "CACHEMESH_API_KEYS_FILE": "/nonexistent/api-keys",
    "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
}


def gateway_settings() -> ServerSettings:
    """The Gateway's server settings as the router builds them from its (default) environment."""
    settings = RouterSettings.from_env(
        Env({**BASE, "ROUTER_LISTEN": "127.0.0.1:0"}), load_model_table()
    )
    return settings.server


class Calls:
    """The server's methods: ``Unary`` answers as many bytes as asked; ``Quiet`` sends nothing
    until ``release`` is set, then one message."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def unary(
        self, request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        return b"x" * int(request.decode())

    async def quiet(
        self, _request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        await self.release.wait()
        yield b"done"

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Ping",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Quiet": grpc.unary_stream_rpc_method_handler(self.quiet),
            },
        )


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[int, Calls]]:
    """A gRPC server with the Gateway's options, its least ping interval scaled as the test's
    keepalive is (the ratio of the front's keepalive to it kept)."""
    settings = gateway_settings()
    policy = settings.connections or ConnectionPolicy()
    scaled = replace(
        policy, min_ping_interval_ms=KEEPALIVE_MS * MIN_PING_INTERVAL_MS // KEEPALIVE_TIME_MS
    )
    server = grpc.aio.server(options=grpc_server_options(replace(settings, connections=scaled)))
    calls = Calls()
    server.add_generic_rpc_handlers((calls.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, calls
    finally:
        calls.release.set()
        await server.stop(None)


def _raw(data: bytes) -> bytes:
    return data


def front_options() -> list[tuple[str, int | str]]:
    """The HTTP front's channel options, its keepalive the test's."""
    options = dict(channel_options(4 << 20))
    assert options["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    options["grpc.keepalive_time_ms"] = KEEPALIVE_MS
    return list(options.items())


async def busy_loop(stop: asyncio.Event) -> None:
    """Keeps the event loop (and its core) busy in slices, as a loaded process would."""
    digest = b""
    while not stop.is_set():
        for _ in range(2000):
            digest = hashlib.sha256(digest).digest()
        await asyncio.sleep(0)


async def _with_load(work: Callable[[], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    load = asyncio.create_task(busy_loop(stop))
    try:
        await work()
    finally:
        stop.set()
        await load


async def test_the_fronts_pings_never_earn_a_goaway(gateway: tuple[int, Calls]) -> None:
    port, calls = gateway
    relay = Relay(port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await relay.start()}", options=front_options())
    try:
        unary = channel.unary_unary("/test.Ping/Unary", _raw, _raw)
        quiet_stream = channel.unary_stream("/test.Ping/Quiet", _raw, _raw)(b"")

        async def work() -> None:
            for size in (10, 1000, 1 << 20, 10, 3 << 20, 100_000) * 5:
                await asyncio.gather(*(unary(str(size).encode()) for _ in range(4)))
            # quiet but for the stream that sends nothing (a model still thinking)
            await relay.frames.pings_reach(relay.frames.pings + QUIET_PINGS)

        await _with_load(work)
        assert relay.frames.goaways == []
        calls.release.set()
        assert [message async for message in quiet_stream] == [b"done"]
        assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
        await relay.close()


async def test_an_idle_connection_of_the_front_is_never_cut(gateway: tuple[int, Calls]) -> None:
    port, _calls = gateway
    relay = Relay(port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{await relay.start()}", options=front_options())
    try:
        await channel.unary_unary("/test.Ping/Unary", _raw, _raw)(
            b"1"
        )  # connected, then no call at all
        await _with_load(lambda: relay.frames.pings_reach(QUIET_PINGS))
        assert relay.frames.goaways == []
        assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
        await relay.close()


async def test_a_ping_flood_is_cut_off() -> None:
    """A client pinging in a tight loop, against the Gateway's options as shipped (unscaled)."""
    server = grpc.aio.server(options=grpc_server_options(gateway_settings()))
    server.add_generic_rpc_handlers((Calls().handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(PREFACE + frame(SETTINGS, 0))
        writer.write(b"".join(frame(PING, 0, struct.pack(">Q", i)) for i in range(100)))
        await writer.drain()
        seen = Frames()

        def on_frame(kind: int, _flags: int, payload: bytes) -> None:
            if kind == GOAWAY:
                seen.goaway(int.from_bytes(payload[4:8], "big"), payload[8:])

        async for _chunk in frames(reader, 0, on_frame):  # until the server closes it
            pass
        assert seen.goaways == [(ENHANCE_YOUR_CALM, b"too_many_pings")]
    finally:
        writer.close()
        await server.stop(None)
