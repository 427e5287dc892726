"""The router's own pause (its process SIGSTOPped, its host swapping, a long collection) is no
silence of a replica's: when the event loop runs again, its overdue watchdog timers run before
gRPC hands over the chunks that came meanwhile. A watch that fires late looks again once the
stream could deliver them, instead of cutting a healthy call (``own_pause``); a replica silent
after the pause as well is still cut. The loop's clock is injected: ``PausableLoop`` jumps it
forward as a stopped process finds it on SIGCONT."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from cachemesh.v1 import model_pb2
from services.router import dispatch
from services.router.dependencies import CallFailed
from services.router.dispatch import SilenceWatch, Silent
from services.router.own_pause import paused_s

_T = TypeVar("_T")
STOPPED_S = 30.0  # the router's pause, on its loop's clock
FLOOR_S = 0.2  # the silence allowed (the floor; no pace, no queue)


class PausableLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves forward (``stop``): the time a stopped process
    did not run, as its monotonic clock goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_s = 0.0

    def time(self) -> float:
        return super().time() + self.stopped_s

    def stop_for(self, stopped_s: float, then: Callable[[], None] | None) -> None:
        """Moves the clock ``stopped_s`` on; ``then`` (the stream's data handed over by gRPC)
        runs a turn after the timers the jump made overdue."""
        self.stopped_s += stopped_s
        if then is not None:
            self.call_soon(self.call_soon, then)


def _run(scenario: Callable[[PausableLoop], Awaitable[_T]]) -> _T:
    loop = PausableLoop()
    try:
        return loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


class Held:
    """A call mid-answer: one chunk at once, the next once ``arrived`` is set."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self._first = True

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self._first:
            self._first = False
            return model_pb2.GenerateChunk(text="a")
        await self.arrived.wait()
        return model_pb2.GenerateChunk(text="b")

    def cancel(self) -> None:
        pass


async def _read_across_a_pause(loop: PausableLoop, delivered: bool) -> str:
    stream = Held()
    watch = SilenceWatch(FLOOR_S, lambda: 0.0, lambda: 0, loop.time)
    try:
        await watch.read(stream)
        reading = asyncio.ensure_future(watch.read(stream))
        await asyncio.sleep(0)  # the read waits, the watch's timer armed
        loop.stop_for(STOPPED_S, stream.arrived.set if delivered else None)
        chunk = await reading
        return "" if chunk is None else chunk.text
    finally:
        watch.close()


def test_a_chunk_that_came_while_the_router_was_stopped_is_read_not_cut() -> None:
    assert _run(lambda loop: _read_across_a_pause(loop, delivered=True)) == "b"


def test_a_replica_silent_after_the_routers_pause_too_is_still_cut() -> None:
    with pytest.raises(Silent):
        _run(lambda loop: _read_across_a_pause(loop, delivered=False))


async def _first_report_across_a_pause(loop: PausableLoop, delivered: bool) -> str:
    reported = asyncio.Event()

    async def call() -> str:
        await reported.wait()
        return "start"

    loop.call_soon(loop.stop_for, STOPPED_S, reported.set if delivered else None)
    return await dispatch._stalled_after(call(), FLOOR_S, FLOOR_S / 2, lambda: 0)


def test_a_first_report_that_came_while_the_router_was_stopped_is_not_a_stall() -> None:
    assert _run(lambda loop: _first_report_across_a_pause(loop, delivered=True)) == "start"


def test_a_replica_with_no_first_report_after_the_routers_pause_too_is_handed_over() -> None:
    with pytest.raises(CallFailed):
        _run(lambda loop: _first_report_across_a_pause(loop, delivered=False))


def test_lateness_past_a_tenth_of_the_limit_is_the_routers_pause() -> None:
    assert paused_s(10.0, 10.05, 1.0) == 0.0  # an event loop's jitter: counted as silence
    assert paused_s(10.0, 40.0, 1.0) == 30.0
    assert paused_s(10.0, 9.0, 1.0) == 0.0
