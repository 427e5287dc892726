"""prefix-cache's stop waits for its background tasks (the Redis health loop, the warm-prefix
gauge) a bounded time: one that takes its cancel and keeps running (as a health loop once did)
is abandoned, named in one ERROR line, and the stop ends."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.background import cancel_within
from services.prefix_cache.app import serve
from services.prefix_cache.redis_health import RedisHealth
from services.tools.stack.ports import free_port

TOKEN = "test-internal-token-0123456789"
STARTED = "prefix-cache started, NOT_SERVING"


class Stubborn:
    """A loop that takes every cancel and goes on, until ``release``."""

    def __init__(self) -> None:
        self.cancels = 0
        self._released = asyncio.Event()

    async def run(self, *_: object) -> None:
        while not self._released.is_set():
            try:
                await self._released.wait()
            except asyncio.CancelledError:
                self.cancels += 1

    def release(self) -> None:
        self._released.set()


async def test_a_task_that_ignores_its_cancel_is_abandoned_after_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stubborn = Stubborn()

    async def polite() -> None:
        await asyncio.Event().wait()

    tasks = [
        asyncio.create_task(stubborn.run(), name="stubborn"),
        asyncio.create_task(polite(), name="polite"),
    ]
    await asyncio.sleep(0)  # both started
    try:
        left = await asyncio.wait_for(cancel_within(tasks, 0.05, "test stop"), 10)
        assert [t.get_name() for t in left] == ["stubborn"] and stubborn.cancels == 1
        assert tasks[1].cancelled()
        (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "test stop" in line and "stubborn" in line and "polite" not in line
    finally:
        stubborn.release()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_tasks_that_end_at_their_cancel_are_waited_for_and_their_errors_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing() -> None:
        raise RuntimeError("the gauge's read failed")

    tasks = [asyncio.create_task(failing(), name="gauge")]
    await asyncio.sleep(0)
    assert await cancel_within(tasks, 5.0, "test stop") == []
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "gauge" in line and "the gauge's read failed" in line
    assert await cancel_within([], 5.0, "test stop") == []


async def test_prefix_cache_stops_though_its_health_loop_ignores_the_cancel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ``close()`` gathered the background tasks with no bound, so a health loop that
    took its cancel and kept looping held the stop forever (a test once hung there)."""
    stubborn = Stubborn()
    monkeypatch.setattr(RedisHealth, "run", lambda self, *_: stubborn.run())
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # down: NOT_SERVING
        "CACHEMESH_GRACE_S": "0",
        "OTEL_SDK_DISABLED": "true",
    }
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(environ, stop))
    try:
        # its Redis is down: it starts NOT_SERVING (the line that says so), never SERVING
        for _ in range(600):
            if any(r.getMessage().startswith(STARTED) for r in caplog.records):
                break
            assert not serving.done(), serving.result()
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("prefix-cache never said it started")
        stop.set()
        done, _ = await asyncio.wait({serving}, timeout=30)  # no cancel: it would be taken too
        assert serving in done, "prefix-cache's stop did not end"
        serving.result()
        assert stubborn.cancels >= 1
        assert any("redis-health" in r.getMessage() for r in caplog.records if r.levelno >= 40)
    finally:
        stubborn.release()
        await asyncio.wait({serving}, timeout=30)
