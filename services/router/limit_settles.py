"""The limits' settles (``Settle``: tokens back to a tenant's rate, a cost to its budgets, a
hold released), and those that failed (the store down or silent), waiting in the router to be
sent again until the store answers (``PendingSettles``): in a bounded queue, oldest first, each
under its own id so that the store counts it once; a settle given up is counted lost."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import Clock, Throttle
from services.router.limit_policy import LimitPolicy
from services.router.limit_store import (
    AMBIGUOUS_REPLAY_MS,
    SETTLE_REPLAY_WINDOW_MS,
    Hold,
    SettleNotSent,
)

log = logging.getLogger("cachemesh.router.limits")

# Settles that failed (the store down or silent) wait in the router for it to answer again:
# at most this many, for at most SETTLE_REPLAY_WINDOW_MS (``limit_store``), tried again this
# often.
MAX_PENDING_SETTLES = 10_000
SETTLE_REPLAY_S = 1.0
LOST_LOG_INTERVAL_MS = 60_000  # settles lost are logged at most once in this interval


@dataclass
class Settle:
    """A count for the store; ``settle_id`` makes it count once, however often it is sent
    within ``SETTLE_MARKER_MS`` of a try that may have counted it."""

    tenant: str
    policy: LimitPolicy
    refund: int
    cost_nanos: int
    settle_id: str
    at_ms: int  # when it was first sent (the limiter's ``ages``: monotonic)
    incurred_ms: int | None = None  # when its cost was incurred (the wall; None: when sent)
    # when a try that may have counted it was sent (``ages``; None: no such try, each surely
    # not sent)
    ambiguous_ms: int | None = None
    release: Hold | None = None  # the hold it releases (its request's, at its end)

    def failed(self, exc: Exception, sent_ms: int) -> None:
        """Notes a try sent at ``sent_ms`` that failed with ``exc``."""
        if not isinstance(exc, SettleNotSent) and self.ambiguous_ms is None:
            self.ambiguous_ms = sent_ms


class PendingSettles:
    """The settles that failed, sent again (``send``) every ``replay_every_s`` while any wait,
    until the store answers; at most ``max_pending`` of them, each for at most
    ``SETTLE_REPLAY_WINDOW_MS`` (``ages``: monotonic). ``lost``: told how many were dropped."""

    def __init__(
        self,
        send: Callable[[Settle], Awaitable[None]],
        ages: Clock,
        lost: Callable[[int], None] | None = None,
        max_pending: int = MAX_PENDING_SETTLES,
        replay_every_s: float = SETTLE_REPLAY_S,
    ) -> None:
        self._send = send
        self._ages = ages
        self._lost = lost
        self._max_pending = max_pending
        self._replay_every_s = replay_every_s
        self._pending: deque[Settle] = deque()
        self.replaying: asyncio.Task[None] | None = None
        self._lost_log = Throttle(ages, LOST_LOG_INTERVAL_MS)

    @property
    def count(self) -> int:
        """Settles waiting for the store to answer again."""
        return len(self._pending)

    def queue(self, count: Settle) -> None:
        """Keeps a failed settle for a replay (never waits: requests go on)."""
        if len(self._pending) >= self._max_pending:
            self.drop(1, f"{self._max_pending} wait already")
            return
        self._pending.append(count)
        if self.replaying is None or self.replaying.done():
            self.replaying = asyncio.create_task(self._replay(), name="limits-settle-replay")

    async def _replay(self) -> None:
        while self._pending:
            await asyncio.sleep(self._replay_every_s)
            await self.replay_pending()

    async def replay_pending(self) -> None:
        """Sends the pending settles, oldest first, until one fails (the store is still down:
        the rest wait for the next try); drops those past the replay window, and those a try
        may have counted whose id the store may have forgotten (``AMBIGUOUS_REPLAY_MS``)."""
        while self._pending:
            count = self._pending[0]
            now = self._ages.now_ms()
            if now - count.at_ms > SETTLE_REPLAY_WINDOW_MS:
                self._pending.popleft()
                self.drop(1, "not sent within the replay window")
                continue
            if count.ambiguous_ms is not None and now - count.ambiguous_ms > AMBIGUOUS_REPLAY_MS:
                self._pending.popleft()
                self.drop(1, "a timed-out try may have counted them and its mark has lapsed")
                continue
            try:
                await self._send(count)
            except Exception as exc:
                count.failed(exc, now)
                return
            if self._pending and self._pending[0] is count:
                self._pending.popleft()

    def drop(self, n: int, why: str, *, force: bool = False) -> None:
        """Settles lost (their cost never reaches the budgets): counted, logged once an
        interval (``force``: now)."""
        if self._lost is not None:
            self._lost(n)
        lost = self._lost_log.due(n, force=force)
        if lost:
            log.warning(
                "limits store: %d settles lost (%s); their costs and tokens are not counted "
                "against the tenants' limits",
                lost,
                why,
            )

    async def close(self) -> None:
        """The replays stopped (bounded, as the limiter's drain is) and a last try made; what
        is left is lost with the process (counted, logged now)."""
        if self.replaying is not None:
            await cancel_within([self.replaying], TASKS_END_S, "limits store close")
        await self.replay_pending()  # a last try; what is left is lost with the process
        if self._pending:
            self.drop(len(self._pending), "the router stopped", force=True)
            self._pending.clear()
