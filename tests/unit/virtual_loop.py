"""An event loop whose time is a test's clock, moved on by the loop itself.

The router's timers (a stall's hand-over, the silence watch, ``own_pause``'s lateness) run on
the event loop's clock, its measures on the injected clock. A test whose fakes wait in real time
and advance a fake clock by what each wait was meant to take makes those two clocks drift apart
on a loaded machine (a 2 ms sleep there takes 3-7 ms): a timer due after 30 ms of loop time fired
when the fake clock had moved 4-24 ms, so the router measured a stall shorter than the wait it
gave. ``VirtualTimeLoop`` makes them one: its ``time()`` is the test's clock, and when no
callback is ready, no I/O is waiting and no thread is at work, it moves that clock on to its next
timer at once instead of sleeping. A wait of so many seconds (``asyncio.sleep``, a timeout,
``call_at``) then takes exactly that long on the clock, however loaded the machine; a fake may
still move the clock on by hand (timers it makes overdue fire late, as after a pause).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar, TypeVarTuple

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class SettableClock(Protocol):
    """A test's clock: ``now`` in seconds, read and moved on by hand."""

    now: float


class _Selector(selectors.DefaultSelector):
    """The loop's selector: a wait for I/O or the next timer polls the I/O, and if none is
    there, asks ``jump`` to move the clock on by the wait instead of sleeping it (False: a
    thread is at work, whose end wakes the real wait)."""

    def __init__(self, jump: Callable[[float], bool]) -> None:
        super().__init__()
        self._jump = jump

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return super().select(timeout)  # nothing scheduled (a thread's end wakes it), or poll
        ready = super().select(0)
        if ready or not self._jump(timeout):
            return ready or super().select(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on ``clock``: see the module's docstring."""

    def __init__(self, clock: SettableClock) -> None:
        self._virtual = clock
        self._in_threads = 0  # executor calls not yet ended: time does not jump meanwhile
        super().__init__(_Selector(self._jump))

    def time(self) -> float:
        return self._virtual.now

    def _jump(self, wait_s: float) -> bool:
        if self._in_threads:
            return False
        self._virtual.now += wait_s
        return True

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[*_Ts], _T], *args: *_Ts
    ) -> asyncio.Future[_T]:
        future = super().run_in_executor(executor, func, *args)
        self._in_threads += 1
        future.add_done_callback(self._thread_ended)
        return future

    def _thread_ended(self, _: asyncio.Future[Any]) -> None:
        self._in_threads -= 1


def run_on_clock(clock: SettableClock, scenario: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Runs ``scenario`` to its end on a ``VirtualTimeLoop`` of ``clock``, then closes it."""
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(scenario())
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
