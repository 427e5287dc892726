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
``max_queue`` waiting texts a new one is refused at once (``QueueFull``): it would wait longer
than any caller's deadline, and the service would go on embedding for nobody long after the
burst.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from services.semantic_cache.embedder import Embedder

Row = npt.NDArray[np.float32]


class QueueFull(Exception):
    """The embedding queue is full: the text was refused at once, never queued."""


class BatcherEvents(Protocol):
    """What the micro-batcher tells its metrics."""

    def embedded(self, texts: int, seconds: float) -> None:
        """One embedder call of ``texts`` texts took ``seconds``."""

    def embed_queue(self, texts: int) -> None:
        """``texts`` texts wait now."""

    def embed_shed(self) -> None:
        """A text was refused: the queue was full."""

    def embed_dropped(self) -> None:
        """A queued text's caller went (timed out, cancelled): it is not embedded."""


@dataclass(eq=False)
class _Waiting:
    text: str
    future: asyncio.Future[Row]
    deadline: float  # on the batcher's clock; inf: none
    queued: bool = True  # False once taken into a batch, or dropped


def _expire(future: asyncio.Future[Row]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("the caller's deadline passed"))


class MicroBatcher:
    def __init__(
        self,
        embedder: Embedder,
        *,
        solo: Embedder | None = None,
        max_batch: int = 32,
        window_s: float = 0.0,
        max_queue: int = 512,
        events: BatcherEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``solo``: the embedder of a text that runs alone (same version as ``embedder``);
        ``max_queue``: the most texts waiting (beyond: ``QueueFull``); ``events`` hears of each
        embedder call, of the queue's length, of refused and dropped texts (the metrics);
        ``clock``: seconds, monotonic (the callers' deadlines, the calls' durations)."""
        if max_batch < 1 or window_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and window_s >= 0")
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
        self._queue: deque[_Waiting] = deque()
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
        return len(self._queue)

    async def embed_one(self, text: str, *, within_s: float | None = None) -> Row:
        """The text's row. ``within_s`` (None: no limit): the caller's time from now; past
        it, ``TimeoutError`` (and the text is dropped if still queued). ``QueueFull`` at once
        when ``max_queue`` texts wait already."""
        if within_s is not None and within_s <= 0:
            raise TimeoutError("no time left to embed the text")
        if len(self._queue) >= self._max_queue:
            if self._events is not None:
                self._events.embed_shed()
            raise QueueFull(
                f"semantic-cache is busy: {len(self._queue)} texts wait to be embedded "
                f"(SEMANTIC_CACHE_EMBED_MAX_QUEUE); the request goes on without L1"
            )
        loop = asyncio.get_running_loop()
        deadline = math.inf if within_s is None else self._clock() + within_s
        waiting = _Waiting(text, loop.create_future(), deadline)
        self._queue.append(waiting)
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
                waiting.queued = False
                self._queue.remove(waiting)
                self._dropped()
                self._queue_changed()

    def _next_batch(self) -> list[_Waiting]:
        """Up to ``max_batch`` queued texts whose callers still wait, oldest first; the
        others (cancelled, or past their deadline: those get ``TimeoutError``) are dropped."""
        batch: list[_Waiting] = []
        now = self._clock()
        while self._queue and len(batch) < self._max_batch:
            waiting = self._queue.popleft()
            waiting.queued = False
            if waiting.deadline <= now:
                _expire(waiting.future)
            if waiting.future.done():
                self._dropped()
                continue
            batch.append(waiting)
        self._queue_changed()
        return batch

    def _dropped(self) -> None:
        if self._events is not None:
            self._events.embed_dropped()

    def _queue_changed(self) -> None:
        if self._events is not None:
            self._events.embed_queue(len(self._queue))

    async def _drain(self) -> None:
        try:
            if self._window_s > 0:
                await asyncio.sleep(self._window_s)
            while self._queue:
                batch = self._next_batch()
                if not batch:
                    continue
                texts = [waiting.text for waiting in batch]
                embedder = self._embedder
                if self._solo is not None and len(texts) == 1 and not self._queue:
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
