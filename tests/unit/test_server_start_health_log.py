"""The start-up's last log line says what the health check answers.

A service whose own health is down as its warm-up ends (prefix-cache started while its Redis
does not answer) logged "prefix-cache SERVING" while grpc.health.v1 and GET /readyz answered
NOT_SERVING (503): an operator reading the log saw a healthy service that no load balancer
would send a call to. Now that line is a WARNING saying NOT_SERVING; SERVING when it is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import HealthSwitch, ServerSettings, ServiceSpec, run_service
from services.tools.stack.ports import free_port

SERVICE = "test.v1.Nothing"


async def _status(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
        for _ in range(200):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.025)
                continue
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    raise AssertionError("the test server never answered its health check")


async def _started(serving: bool, caplog: pytest.LogCaptureFixture) -> tuple[str, list[str]]:
    """Runs a service whose health switch says ``serving`` once warm; its health check's
    answer and the server's log lines once its start-up has ended."""
    health = HealthSwitch()

    async def warmup() -> None:
        await health.set(serving)  # before the start-up ends, as RedisHealth.start does

    port = free_port()
    stop = asyncio.Event()
    spec = ServiceSpec(
        name="test",
        settings=ServerSettings(f"127.0.0.1:{port}", grace_s=0.5, max_message_bytes=1 << 20),
        service_names=[SERVICE],
        register=lambda server: None,
        warmup=warmup,
        health=health,
    )
    caplog.set_level(logging.INFO, logger="cachemesh.server")
    running = asyncio.ensure_future(run_service(spec, stop))
    try:
        for _ in range(400):
            if any("frozen" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        status = await _status(f"127.0.0.1:{port}")
        logged = [r for r in caplog.records if r.name == "cachemesh.server"]
        lines = [f"{r.levelname} {r.getMessage()}" for r in logged]
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    return status, lines


async def test_a_service_not_serving_as_it_starts_does_not_log_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, lines = await _started(False, caplog)
    assert status == "NOT_SERVING"
    assert "INFO test SERVING" not in lines
    (line,) = [x for x in lines if x.startswith("WARNING test") and "NOT_SERVING" in x]
    assert "started" in line


async def test_a_service_serving_as_it_starts_logs_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, lines = await _started(True, caplog)
    assert status == "SERVING"
    assert "INFO test SERVING" in lines
    assert not [x for x in lines if x.startswith("WARNING")]
