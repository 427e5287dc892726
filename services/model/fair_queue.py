"""A replica's tenant-fair queue in front of its engine: deficit round robin by work.

The calls waiting for the engine (the simulator's one prefill at a time, or a provider
engine's ``MODEL_MAX_CONCURRENT_CALLS`` slots) are kept per tenant, first come first served
within a tenant. When the engine can take one more, the tenants with calls waiting are
visited in turn (deficit round robin, Shreedhar and Varghese 1996): each visit adds
``quantum`` to the tenant's deficit, and the tenant's oldest call is admitted once its cost
fits in that deficit (which it then pays); a tenant keeps its turn while its next call still
fits. The cost is the work the call asks of the engine, in TOKENS: its uncached prompt tokens
for the simulator's prefill, its prompt tokens for a provider engine (its KV reuse is not
known before the call), ``MIN_COST`` at the least. So a tenant with a backlog gets the
engine's tokens in equal share with every other tenant with calls waiting, and a light
tenant's call waits behind at most about one call of each other tenant (a small quantum
makes a turn one call: the queue then serves the call whose tenant needs the fewest rounds).
A tenant whose queue empties leaves the round, its deficit dropped (no credit saved up).

A waiting call that is cancelled (its caller left, its deadline passed: the caller bounds
the wait) leaves its tenant's queue at once; no other call's place or turn changes. A call
admitted but cancelled before it ran hands its place on at once.

One event loop owns it: no lock. Times come from the injected clock (seconds).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from services.common.fair_share import MIN_COST as MIN_COST
from services.common.fair_share import QUANTUM

# tokens added to a waiting tenant's deficit at each of its turns (the router predicts a
# request's turn with the same, ``services/router/replica_state.py``)
DEFAULT_QUANTUM = QUANTUM
# the replica's span attribute: how long the call waited for its turn, in milliseconds
QUEUE_WAIT_ATTRIBUTE = "cachemesh.queue_wait_ms"


class QueueWatcher(Protocol):
    """Told when a tenant's waiting calls change (a gauge of them by tenant)."""

    def waiting(self, tenant: str, change: int) -> None: ...


@dataclass
class _Call:
    tenant: str
    cost: int
    admitted: asyncio.Future[None]


@dataclass
class _Tenant:
    calls: deque[_Call] = field(default_factory=deque)
    deficit: int = 0
    turn: bool = False  # its turn is under way: its quantum for this visit is added


@dataclass
class Admission:
    """A call let through: how long it waited (seconds) and how many calls were ahead."""

    waited_s: float
    ahead: int


class FairQueue:
    """At most ``capacity`` calls at the engine at once; the rest wait, tenant-fair."""

    def __init__(
        self,
        capacity: int,
        clock: Callable[[], float],
        *,
        quantum: int = DEFAULT_QUANTUM,
        watcher: QueueWatcher | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if quantum <= 0:
            raise ValueError(f"quantum must be > 0, got {quantum}")
        self._capacity = capacity
        self._clock = clock
        self._quantum = quantum
        self._watcher = watcher
        self._running = 0
        self._tenants: dict[str, _Tenant] = {}  # those with calls waiting, in round order
        self._waiting = 0

    @property
    def running(self) -> int:
        """Calls admitted and not yet released."""
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def waiting_of(self, tenant: str) -> int:
        found = self._tenants.get(tenant)
        return 0 if found is None else len(found.calls)

    @asynccontextmanager
    async def slot(self, tenant: str, cost: int) -> AsyncIterator[Admission]:
        """Holds one of the engine's places for the block; waits its turn for it first."""
        admission = await self.acquire(tenant, cost)
        try:
            yield admission
        finally:
            self.release()

    async def acquire(self, tenant: str, cost: int) -> Admission:
        """Waits for the call's turn (at once when a place is free and nobody waits); the
        caller must ``release`` once the engine is done with it. Cancelled: it leaves."""
        began = self._clock()
        if self._running < self._capacity and not self._waiting:
            self._running += 1
            return Admission(0.0, 0)
        ahead = self._waiting + self._running
        call = _Call(tenant, max(cost, MIN_COST), asyncio.get_running_loop().create_future())
        queue = self._tenants.get(tenant)
        if queue is None:
            queue = self._tenants[tenant] = _Tenant()  # joins the round last
        queue.calls.append(call)
        self._waiting += 1
        self._tell(tenant, 1)
        # leaves the queue as its future is cancelled (the task's cancel cancels it at once),
        # not later when the task runs its except: a release in between would admit it
        call.admitted.add_done_callback(functools.partial(self._left_if_cancelled, call))
        try:
            await call.admitted
        except asyncio.CancelledError:
            if call.admitted.done() and not call.admitted.cancelled():
                self.release()  # admitted as it was cancelled: its place goes on at once
            else:
                self._leave(call)
            raise
        return Admission(self._clock() - began, ahead)

    def release(self) -> None:
        """The engine is done with an admitted call: the next call's turn, if any waits."""
        if self._running <= 0:
            raise RuntimeError("release without an admitted call")
        self._running -= 1
        self._admit()

    def _admit(self) -> None:
        while self._running < self._capacity and self._waiting:
            call = self._next()
            self._waiting -= 1
            self._tell(call.tenant, -1)
            if call.admitted.done():
                continue  # cancelled and not yet gone: never given a place (it would be lost)
            self._running += 1
            call.admitted.set_result(None)

    def _next(self) -> _Call:
        """Deficit round robin over the tenants with calls waiting (there is one at least)."""
        tenants = self._tenants
        visited = 0
        while True:
            name = next(iter(tenants))
            tenant = tenants[name]
            if not tenant.turn:
                tenant.turn = True
                tenant.deficit += self._quantum
            head = tenant.calls[0]
            if head.cost <= tenant.deficit:
                tenant.deficit -= head.cost
                tenant.calls.popleft()
                if not tenant.calls:
                    del tenants[name]  # leaves the round; its deficit goes with it
                return head
            tenant.turn = False  # its turn ends: to the back of the round
            del tenants[name]
            tenants[name] = tenant
            visited += 1
            if visited >= len(tenants):
                # a whole round and no call fitted: the rounds in which none would have, at once
                rounds = min(_rounds_short(t, self._quantum) for t in tenants.values()) - 1
                for t in tenants.values():
                    t.deficit += rounds * self._quantum
                visited = 0

    def _left_if_cancelled(self, call: _Call, admitted: asyncio.Future[None]) -> None:
        if admitted.cancelled():
            self._leave(call)

    def _leave(self, call: _Call) -> None:
        tenant = self._tenants.get(call.tenant)
        if tenant is None or call not in tenant.calls:
            return
        tenant.calls.remove(call)
        self._waiting -= 1
        self._tell(call.tenant, -1)
        if not tenant.calls:
            del self._tenants[call.tenant]  # its deficit goes with it; no one else's turn moves

    def _tell(self, tenant: str, change: int) -> None:
        if self._watcher is not None:
            self._watcher.waiting(tenant, change)


def _rounds_short(tenant: _Tenant, quantum: int) -> int:
    """The visits the tenant still needs before its oldest call fits (1 at least)."""
    short = tenant.calls[0].cost - tenant.deficit
    return max(1, math.ceil(short / quantum))
