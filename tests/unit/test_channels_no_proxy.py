"""Internal gRPC calls never go through an HTTP proxy: a shell or a container with
``https_proxy`` set (Docker puts it in every container when its client has proxies configured)
sent every call between the services, loopback included, to the proxy: failing while health
said SERVING, or carrying prompts and the internal token through it in plaintext."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channels import channel_options
from services.common.telemetry import otlp_channel_options
from services.tools.stack.health import SERVING, probe
from services.tools.stack.ports import free_port


def _dead_port() -> int:
    return free_port()


@pytest.fixture
async def address(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = f"http://127.0.0.1:{_dead_port()}"
    for name in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_an_internal_channel_ignores_the_proxy_variables(address: str) -> None:
    async with grpc.aio.insecure_channel(address, options=channel_options(1 << 20)) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_stacks_health_probe_ignores_the_proxy_variables(address: str) -> None:
    # in a thread: the server answers on this test's event loop
    assert await asyncio.to_thread(probe, address, 5) == SERVING


@pytest.mark.parametrize(
    ("endpoint", "direct"),
    [
        ("http://127.0.0.1:4317", True),
        ("http://localhost:4317", True),
        ("http://[::1]:4317", True),
        ("https://collector.example.com:4317", False),  # the operator's proxy settings apply
    ],
)
def test_the_otlp_exporter_goes_direct_to_a_loopback_collector(endpoint: str, direct: bool) -> None:
    assert (("grpc.enable_http_proxy", 0) in otlp_channel_options(endpoint)) is direct
