"""The HTTP front's warning for a Gateway that is down: logged once per interval, not once per
request (with the router down, a front at 1,000 req/s wrote 1,000 identical lines a second)."""

from __future__ import annotations

import logging

import grpc
import pytest

from services.common.clock import ManualClock
from services.http_front.gateway import UNREACHABLE, UNREACHABLE_LOG_EVERY_MS, Gateway
from services.tools.stack.ports import free_port


def _nowhere() -> str:
    return f"127.0.0.1:{free_port()}"


def _refused() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="failed to connect to all addresses; Connection refused",
    )


async def test_a_down_gateway_is_logged_once_an_interval_with_the_count_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    gateway = Gateway(_nowhere(), 1.0, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="cachemesh.http_front"):
            for _ in range(50):
                assert gateway._failure(_refused()).message == UNREACHABLE
                clock.advance(ms=10)
            first = [r.getMessage() for r in caplog.records]
            assert len(first) == 1 and "unreachable" in first[0]
            caplog.clear()
            clock.advance(ms=UNREACHABLE_LOG_EVERY_MS)
            gateway._failure(_refused())
            later = [r.getMessage() for r in caplog.records]
            assert len(later) == 1
            assert "49 more requests failed" in later[0]
    finally:
        await gateway.close()
