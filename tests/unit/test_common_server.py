"""The shared bootstrap: health follows readiness, a failed warm-up closes the server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from services.common.server import ServerSettings, ServiceSpec, run_service
from services.tools.stack.health import UNREACHABLE, probe
from services.tools.stack.ports import free_port


def _spec(port: int, warmup: asyncio.Event | None, fail: bool = False) -> ServiceSpec:
    async def warm() -> None:
        if warmup is not None:
            await warmup.wait()
        if fail:
            raise RuntimeError("model file is corrupt")

    return ServiceSpec(
        name="test",
        settings=ServerSettings(f"127.0.0.1:{port}", grace_s=0.5, max_message_bytes=1 << 20),
        service_names=["test.v1.Nothing"],
        register=lambda server: None,
        warmup=warm,
    )


async def _status(port: int) -> str:
    return await asyncio.to_thread(probe, f"127.0.0.1:{port}", 2.0)


async def _settle(port: int, wanted: str) -> str:
    """The status once it is ``wanted`` (or whatever it is after 5 s)."""
    status = UNREACHABLE
    for _ in range(100):
        status = await _status(port)
        if status == wanted:
            break
        await asyncio.sleep(0.05)
    return status


async def test_not_serving_until_warm_then_serving_then_stops() -> None:
    port, ready, stop = free_port(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(_spec(port, ready), stop))
    assert await _settle(port, "NOT_SERVING") == "NOT_SERVING"
    ready.set()
    assert await _settle(port, "SERVING") == "SERVING"
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_failed_warmup_raises_and_leaves_no_server_listening() -> None:
    port = free_port()
    with pytest.raises(RuntimeError, match="corrupt"):
        await asyncio.wait_for(run_service(_spec(port, None, fail=True)), 10)
    assert await _status(port) == UNREACHABLE


def test_a_bad_configuration_is_one_line_naming_the_variable_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.router"],
        env={"PATH": "/usr/bin:/bin", "MODEL_REPLICAS": "not-a-pair"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "router: configuration error: MODEL_REPLICAS: expected model=host:port, got 'not-a-pair'"
    ]
