"""Test doubles shared by the model engine's unit tests."""

from __future__ import annotations

import asyncio
import heapq
from typing import TypeVar

T = TypeVar("T")


class RecordingSleep:
    """The sleep seam: records each requested duration and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class VirtualTime:
    """The sleep seam on a virtual clock: a sleep waits until ``now`` reaches its end, and
    ``run`` moves ``now`` to the next wake-up only once every task is blocked, so concurrent
    runs interleave as they would in real time, without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    async def __call__(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, self._seq, future))
        self._seq += 1
        await future

    async def settle(self) -> None:
        """Lets every runnable task run on to its next sleep (or its end)."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def run(self, tasks: list[asyncio.Task[T]]) -> list[T]:
        while True:
            await self.settle()
            if all(task.done() for task in tasks):
                return [task.result() for task in tasks if not task.cancelled()]
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)  # a cancelled sleeper
            assert self._sleepers, "every task waits, and on no sleep"
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = wake
            future.set_result(None)
