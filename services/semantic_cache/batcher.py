"""Micro-batching of embedding calls under load.

A text to embed joins a queue. When no batch is running it starts one at once (no added
latency when idle, beyond ``window_s``, 0 by default); while one is running, new texts wait
and go together into the next batch (up to ``max_batch``) as soon as it ends. So under load
the embedder runs batches, whose cost per text is far lower than one call per text, and
throughput approaches its batched rate. Batches run in a worker thread, never on the loop.

A text that runs alone, nothing queued behind it, goes to ``solo`` when there is one: the
same model on more threads per operator. Only a lone text's latency is at stake then (the
service is not busy), and a second thread cuts it by about a third for about a tenth more CPU;
under load, batches run on ``embedder``'s threads, where more threads would only add overhead.
The second session costs 93-166 MB, so the service makes one only when
``SEMANTIC_CACHE_ORT_SOLO_THREADS`` asks for it.

Under overload the queue stays bounded and holds only texts someone still waits for. A text
may come with its caller's time (``within_s``): past it the caller gets ``TimeoutError``, and
a text whose caller has gone (timed out or cancelled) leaves the queue, never embedded. Beyond
``max_queue`` waiting texts, or ``max_tenant_queue`` of its tenant's, a new one is refused at
once (``QueueFull``): it would wait longer than any caller's deadline, and the service would go
on embedding for nobody long after the burst.

And it is shared fairly: each tenant has a queue of its own, and a batch takes one text of each
tenant in turn (round-robin) up to ``max_batch``, so a tenant's burst delays another tenant's
text by about one batch, not by the whole burst. Lookups (a caller waits, with a short
deadline) go ahead of Stores (the answer was served already; only a later hit is at stake), but
Stores keep a share: one text in every ``STORE_EVERY + 1`` while both wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from services.semantic_cache.embedder import Embedder

Row = npt.NDArray[np.float32]
# While Lookups and Stores both wait, a Store is taken after this many Lookups.
STORE_EVERY = 8


class QueueFull(Exception):
    """The embedding queue is full: the text was refused at once, never queued."""


class BatcherEvents(Protocol):
    """What the micro-batcher tells its metrics."""

    def embedded(self, texts: int, seconds: float) -> None:
        """One embedder call of ``texts`` texts took ``seconds``."""

    def embed_queue(self, texts: int) -> None:
        """``texts`` texts wait now."""

    def embed_shed(self, call: str) -> None:
        """A text of a ``call`` ("lookup", "store") was refused: the queue was full."""

    def embed_dropped(self, call: str) -> None:
        """A queued text's caller went (timed out, cancelled): it is not embedded."""


@dataclass(eq=False)
class _Waiting:
    text: str
    tenant: str
    future: asyncio.Future[Row]
    deadline: float  # on the batcher's clock; inf: none
    queued: bool = True  # False once taken into a batch, or dropped


def _expire(future: asyncio.Future[Row]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("the caller's deadline passed"))


class _Lane:
    """The texts of one kind of call, a queue per tenant, served in turn."""

    def __init__(self, call: str) -> None:
        self.call = call
        self.size = 0
        self._tenants: OrderedDict[str, deque[_Waiting]] = OrderedDict()

    def push(self, waiting: _Waiting) -> None:
        self._tenants.setdefault(waiting.tenant, deque()).append(waiting)
        self.size += 1

    def pop(self) -> _Waiting:
        """The oldest text of the tenant whose turn it is; that tenant goes last."""
        tenant, texts = next(iter(self._tenants.items()))
        waiting = texts.popleft()
        if texts:
            self._tenants.move_to_end(tenant)
        else:
            del self._tenants[tenant]
        self.size -= 1
        return waiting

    def count(self, tenant: str) -> int:
        """How many of ``tenant``'s texts wait in this lane."""
        texts = self._tenants.get(tenant)
        return 0 if texts is None else len(texts)

    def remove(self, waiting: _Waiting) -> None:
        texts = self._tenants[waiting.tenant]
        texts.remove(waiting)
        if not texts:
            del self._tenants[waiting.tenant]
        self.size -= 1


class MicroBatcher:
    def __init__(
        self,
        embedder: Embedder,
        *,
        solo: Embedder | None = None,
        max_batch: int = 32,
        window_s: float = 0.0,
        max_queue: int = 512,
        max_tenant_queue: int | None = None,
        events: BatcherEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``solo``: the embedder of a text that runs alone (same version as ``embedder``);
        ``max_queue``: the most texts waiting (beyond: ``QueueFull``), ``max_tenant_queue`` the
        most of one tenant's (None: ``max_queue``); ``events`` hears of each
        embedder call, of the queue's length, of refused and dropped texts (the metrics);
        ``clock``: seconds, monotonic (the callers' deadlines, the calls' durations)."""
        if max_tenant_queue is None:
            max_tenant_queue = max_queue
        if max_batch < 1 or window_s < 0 or not 1 <= max_tenant_queue <= max_queue:
            raise ValueError(
                "max_batch must be >= 1, 1 <= max_tenant_queue <= max_queue and window_s >= 0"
            )
        if solo is not None and solo.version != embedder.version:
            raise ValueError(
                f"the solo embedder is {solo.version}, the batches' {embedder.version}: "
                "their vectors would not compare"
            )
        self._events = events
        self._clock = clock
        self._embedder = embedder
        self._solo = solo
        self._max_batch = max_batch
        self._window_s = window_s
        self._max_queue = max_queue
        self._max_tenant_queue = max_tenant_queue
        self._lookups = _Lane("lookup")
        self._stores = _Lane("store")
        self._lookups_in_turn = 0  # Lookups taken since the last Store
        self._running = False
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0  # how many embed calls were made (for tests and benchmarks)
        self.solo_batches = 0  # how many of them ran on ``solo``

    @property
    def version(self) -> str:
        return self._embedder.version

    @property
    def dim(self) -> int:
        return self._embedder.dim

    @property
    def queued(self) -> int:
        """Texts waiting for a batch."""
        return self._lookups.size + self._stores.size

    async def embed_one(
        self, text: str, tenant: str = "", *, within_s: float | None = None, store: bool = False
    ) -> Row:
        """The text's row. ``within_s`` (None: no limit): the caller's time from now; past
        it, ``TimeoutError`` (and the text is dropped if still queued). ``store``: for a Store
        (behind Lookups). ``QueueFull`` at once when ``max_queue`` texts wait already, or
        ``max_tenant_queue`` of ``tenant``'s."""
        if within_s is not None and within_s <= 0:
            raise TimeoutError("no time left to embed the text")
        lane = self._stores if store else self._lookups
        self._admit(lane, tenant)
        loop = asyncio.get_running_loop()
        deadline = math.inf if within_s is None else self._clock() + within_s
        waiting = _Waiting(text, tenant, loop.create_future(), deadline)
        lane.push(waiting)
        self._queue_changed()
        if not self._running:
            self._running = True
            self._drainer = loop.create_task(self._drain())  # held: a task is weakly referenced
        timer = None if within_s is None else loop.call_later(within_s, _expire, waiting.future)
        try:
            return await waiting.future
        finally:
            if timer is not None:
                timer.cancel()
            if waiting.queued:  # its caller went before its batch: never embedded
                lane.remove(waiting)
                waiting.queued = False
                self._dropped(lane)
                self._queue_changed()

    def _admit(self, lane: _Lane, tenant: str) -> None:
        """Raises ``QueueFull`` when the queue, or the tenant's part of it, is full."""
        if self.queued >= self._max_queue:
            why = f"{self.queued} texts wait to be embedded (SEMANTIC_CACHE_EMBED_MAX_QUEUE)"
        elif (
            mine := self._lookups.count(tenant) + self._stores.count(tenant)
        ) >= self._max_tenant_queue:
            why = (
                f"{mine} texts of this tenant wait to be embedded "
                "(SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT)"
            )
        else:
            return
        if self._events is not None:
            self._events.embed_shed(lane.call)
        raise QueueFull(f"semantic-cache is busy: {why}; the request goes on without L1")

    def _next_batch(self) -> list[_Waiting]:
        """Up to ``max_batch`` queued texts whose callers still wait: the tenants' in turn,
        Lookups first but a Store after each ``STORE_EVERY`` Lookups; the others (cancelled,
        or past their deadline: those get ``TimeoutError``) are dropped."""
        batch: list[_Waiting] = []
        now = self._clock()
        while self.queued and len(batch) < self._max_batch:
            store_turn = self._stores.size > 0 and (
                self._lookups.size == 0 or self._lookups_in_turn >= STORE_EVERY
            )
            lane = self._stores if store_turn else self._lookups
            waiting = lane.pop()
            waiting.queued = False
            if waiting.deadline <= now:
                _expire(waiting.future)
            if waiting.future.done():
                self._dropped(lane)
                continue
            batch.append(waiting)
            self._lookups_in_turn = 0 if store_turn else self._lookups_in_turn + 1
        self._queue_changed()
        return batch

    def _dropped(self, lane: _Lane) -> None:
        if self._events is not None:
            self._events.embed_dropped(lane.call)

    def _queue_changed(self) -> None:
        if self._events is not None:
            self._events.embed_queue(self.queued)

    async def _drain(self) -> None:
        try:
            if self._window_s > 0:
                await asyncio.sleep(self._window_s)
            while self.queued:
                batch = self._next_batch()
                if not batch:
                    continue
                texts = [waiting.text for waiting in batch]
                embedder = self._embedder
                if self._solo is not None and len(texts) == 1 and not self.queued:
                    embedder = self._solo
                    self.solo_batches += 1
                began = self._clock()
                try:
                    vectors = await asyncio.to_thread(embedder.embed, texts)
                except Exception as exc:  # every waiter of the batch gets the error
                    for waiting in batch:
                        if not waiting.future.done():
                            waiting.future.set_exception(exc)
                    continue
                finally:
                    self.batches += 1
                    if self._events is not None:
                        self._events.embedded(len(texts), self._clock() - began)
                for waiting, row in zip(batch, vectors, strict=True):
                    if not waiting.future.done():
                        waiting.future.set_result(row)
        finally:
            self._running = False
