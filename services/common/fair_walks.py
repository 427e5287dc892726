"""One worker thread for the walks of large requests (validation, a query's derivation), shared
fairly by tenant: each tenant's walks wait in a queue of its own and the thread takes the
queues in turn, one walk each, so one tenant's flood of large requests delays another
tenant's request by at most one walk per tenant waiting, not by the whole flood (10 x 900 kB
requests of one tenant held another's 70 kB request 2.95 s on a shared first-come queue). No
tenant is refused for its walks waiting: a tenant's many large prompts at once (agents) wait
their turns, and another tenant's wait stays one walk per tenant waiting."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Walk(Generic[T]):
    run: Callable[[], T]
    done: asyncio.Future[T]


class FairWalks:
    """Runs ``fn(*args)`` on one worker thread (or ``executor``), tenants taken in turn. Not
    thread-safe: used from the event loop only."""

    def __init__(self, name: str, executor: Executor | None = None) -> None:
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=name)
        self._waiting: dict[str, deque[_Walk[Any]]] = {}  # in turn order; none left empty
        # the tenant whose walk runs, and its queue: back at the end of the turn when it ends
        self._running: tuple[str, deque[_Walk[Any]]] | None = None
        self._counts: dict[str, int] = {}  # per tenant, its walks waiting or running

    def count(self, tenant: str) -> int:
        """The tenant's walks waiting or running."""
        return self._counts.get(tenant, 0)

    async def run(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        count = self._counts.get(tenant, 0)
        walk: _Walk[T] = _Walk(lambda: fn(*args), asyncio.get_running_loop().create_future())
        self._counts[tenant] = count + 1
        if self._running is not None and self._running[0] == tenant:
            self._running[1].append(walk)
        else:
            self._waiting.setdefault(tenant, deque()).append(walk)
        walk.done.add_done_callback(lambda _: self._ended(tenant))
        self._next()
        return await walk.done  # cancelled while waiting: it never runs

    def _ended(self, tenant: str) -> None:
        left = self._counts[tenant] - 1
        if left:
            self._counts[tenant] = left
        else:
            del self._counts[tenant]

    def _next(self) -> None:
        while self._running is None and self._waiting:
            tenant = next(iter(self._waiting))
            queue = self._waiting.pop(tenant)
            walk = queue.popleft()
            if walk.done.done():  # cancelled while it waited
                if queue:
                    self._waiting[tenant] = queue
                continue
            self._running = (tenant, queue)
            running = asyncio.wrap_future(self._executor.submit(walk.run))
            running.add_done_callback(partial(self._ran, done=walk.done))

    def _ran(self, ran: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
        assert self._running is not None
        tenant, queue = self._running
        self._running = None
        if queue:
            self._waiting[tenant] = queue  # at the end of the turn: every other tenant first
        if not done.done():
            if ran.cancelled():
                done.cancel()
            elif (error := ran.exception()) is not None:
                done.set_exception(error)
            else:
                done.set_result(ran.result())
        self._next()
