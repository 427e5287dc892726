"""The router's question to prefix-cache's health (``GrpcHealth``, the billing outbox's before
it sends a bill that found prefix-cache down), against a real gRPC server on loopback: True
only for SERVING, or for a peer with no health to say; False for NOT_SERVING or no answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.router.grpc_adapters import GrpcHealth
from services.tools.stack.ports import free_port

PREFIX_CACHE = "cachemesh.v1.PrefixCache"


def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def _asked(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        return await GrpcHealth(health_pb2_grpc.HealthStub(channel), PREFIX_CACHE).serving(5.0)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def test_serving_only_when_prefix_cache_says_so(
    served: tuple[str, health.aio.HealthServicer],
) -> None:
    address, servicer = served
    await servicer.set(PREFIX_CACHE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await _asked(address) is False  # warming up, its Redis down, draining
    await servicer.set(PREFIX_CACHE, health_pb2.HealthCheckResponse.SERVING)
    assert await _asked(address) is True


async def test_no_answer_is_not_serving() -> None:
    assert await _asked(_dead_address()) is False


async def test_a_peer_with_no_health_for_it_is_not_waited_on(
    served: tuple[str, health.aio.HealthServicer],
) -> None:
    address, _ = served  # PREFIX_CACHE never set: NOT_FOUND
    assert await _asked(address) is True
    server = grpc.aio.server()  # no health service at all: UNIMPLEMENTED
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        assert await _asked(f"127.0.0.1:{port}") is True
    finally:
        await server.stop(0)
