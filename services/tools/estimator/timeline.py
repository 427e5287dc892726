"""Virtual time for the replay: a discrete-event scheduler over the shared ``ManualClock``.

Each logged request runs as a task of its own from its arrival; the offline adapters park it
(``VirtualTime.until``) until its logged first token and its logged end, so requests that
overlapped in the log overlap here too. The scheduler moves the clock only once every task a
request started is parked or done ("settled"), to the next arrival or the next release, in
time order (a release before an arrival of the same millisecond). Nothing waits on real time:
a lookup that finds an identical request's lease held re-checks at each later event, up to its
lease-wait budget on the virtual clock (``changed``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextvars import Context, ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.clock import ManualClock

# The record a task serves (set in each request's task; its spawned tasks inherit it).
CURRENT: ContextVar[Timeline | None] = ContextVar("estimator_timeline", default=None)
# Real seconds the replay may go without any task settling before it is called stuck.
STALL_S = 600.0


@dataclass(frozen=True)
class Timeline:
    """One replayed request's logged times on the virtual clock (ms)."""

    time: VirtualTime
    start_ms: int
    end_ms: int  # the logged end (= start_ms for a record without one)
    first_ms: int | None  # the logged first token (a streamed run), else None

    def first_token_ms(self, decode_ms: int, first_delta_ms: int) -> int:
        """When the replica reported its prefill (the router's WARM commit: the prefix is
        readable from then): the logged first token less the decode of the first delta the
        client saw (``first_delta_ms``; the replica reports its prefill before decoding it),
        else the logged end less the answer's decode time (what came before it, the lookup,
        the plan, queueing and the prefill, is the wait for the first token), within the
        logged times."""
        logged = self.first_ms
        first = self.end_ms - decode_ms if logged is None else logged - first_delta_ms
        return min(max(first, self.start_ms), self.end_ms)


Gate = asyncio.Future[None]
T = TypeVar("T")


class VirtualTime:
    def __init__(self, clock: ManualClock, stall_s: float = STALL_S) -> None:
        self._clock = clock
        self._stall_s = stall_s
        self._gates: list[tuple[int, int, Gate]] = []  # (release time, order, gate)
        self._watchers: list[tuple[int, Gate]] = []  # (events seen when parked, gate)
        self._order = itertools.count()
        self._events = 0  # arrivals started and gates released so far
        self._running = 0  # the requests' tasks neither parked nor done
        self._idle = asyncio.Event()
        self._idle.set()

    def now_ms(self) -> int:
        return self._clock.now_ms()

    async def until(self, at_ms: int) -> None:
        """Parks the calling task until the clock reaches ``at_ms`` (now: returns at once)."""
        if at_ms > self.now_ms():
            await self._park(self._gate(at_ms))

    async def changed(self, limit_ms: int) -> None:
        """Parks the calling task until the replay's next event, at the latest ``limit_ms``."""
        if limit_ms > self.now_ms():
            gate = self._gate(limit_ms)
            self._watchers.append((self._events, gate))
            await self._park(gate)

    async def run(self, arrivals: Sequence[tuple[int, Callable[[], Awaitable[None]]]]) -> None:
        """Starts each ``(time, serve)`` at its time (non-decreasing) and returns when every
        one is done; a request's exception is raised here."""
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()
        loop.set_task_factory(self._counting)
        tasks: list[asyncio.Task[None]] = []
        try:
            waiting = list(arrivals)
            while True:
                await self._settle()
                if self._wake_watchers():
                    continue
                gate_at = self._next_gate_ms()
                arrive_at = waiting[0][0] if waiting else None
                if gate_at is None and arrive_at is None:
                    break
                if gate_at is not None and (arrive_at is None or gate_at <= arrive_at):
                    self._advance(gate_at)
                    _, _, gate = heapq.heappop(self._gates)
                    self._release(gate)
                else:
                    assert arrive_at is not None
                    self._advance(arrive_at)
                    _, serve = waiting.pop(0)
                    self._running += 1  # counted from its creation, as the factory would
                    self._idle.clear()
                    tasks.append(asyncio.ensure_future(_served(serve(), self._done)))
                self._events += 1
            await asyncio.gather(*tasks)
        finally:
            loop.set_task_factory(previous)

    def _counting(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Generator[Any, None, T] | Coroutine[Any, Any, T],
        /,
        **kw: Any,
    ) -> asyncio.Task[T]:
        """Every task a request spawns (its WARM commit, its Store, an embedding batch) is
        running until it is done: the clock waits for it."""
        task = asyncio.Task(coro, loop=loop, **kw)
        context: Context | None = kw.get("context")
        if (context.get(CURRENT) if context is not None else CURRENT.get()) is not None:
            self._running += 1
            self._idle.clear()
            task.add_done_callback(lambda _: self._done())
        return task

    def _done(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    def _gate(self, at_ms: int) -> Gate:
        gate: Gate = asyncio.get_running_loop().create_future()
        heapq.heappush(self._gates, (at_ms, next(self._order), gate))
        return gate

    async def _park(self, gate: Gate) -> None:
        self._done()
        try:
            await gate
        except asyncio.CancelledError:
            if gate.cancelled():  # cancelled while parked: running again, to unwind
                self._running += 1
                self._idle.clear()
            raise

    def _release(self, gate: Gate) -> None:
        if not gate.done():
            self._running += 1
            self._idle.clear()
            gate.set_result(None)

    def _wake_watchers(self) -> bool:
        """Wakes the lookups parked before the latest event (each looks once more)."""
        due = [gate for seen, gate in self._watchers if seen < self._events and not gate.done()]
        self._watchers = [(s, g) for s, g in self._watchers if s >= self._events and not g.done()]
        for gate in due:
            self._release(gate)
        return bool(due)

    def _next_gate_ms(self) -> int | None:
        while self._gates and self._gates[0][2].done():  # woken early, or cancelled
            heapq.heappop(self._gates)
        return self._gates[0][0] if self._gates else None

    def _advance(self, to_ms: int) -> None:
        self._clock.advance(ms=max(0, to_ms - self.now_ms()))

    async def _settle(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self._stall_s)
        except TimeoutError:
            raise RuntimeError(
                f"the replay made no progress for {self._stall_s:.0f} s of real time with "
                f"{self._running} task(s) neither parked nor done: a wait the estimator does "
                "not drive by its virtual clock"
            ) from None


async def _served(serve: Awaitable[None], done: Callable[[], None]) -> None:
    try:
        await serve
    finally:
        done()
