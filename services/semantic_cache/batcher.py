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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from services.semantic_cache.embedder import Embedder

Row = npt.NDArray[np.float32]


class MicroBatcher:
    def __init__(
        self,
        embedder: Embedder,
        *,
        solo: Embedder | None = None,
        max_batch: int = 32,
        window_s: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``solo``: the embedder of a text that runs alone (same version as ``embedder``);
        ``on_batch(texts, seconds)`` hears of each embedder call (the metrics)."""
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and window_s >= 0")
        if solo is not None and solo.version != embedder.version:
            raise ValueError(
                f"the solo embedder is {solo.version}, the batches' {embedder.version}: "
                "their vectors would not compare"
            )
        self._on_batch = on_batch
        self._clock = clock
        self._embedder = embedder
        self._solo = solo
        self._max_batch = max_batch
        self._window_s = window_s
        self._queue: list[tuple[str, asyncio.Future[Row]]] = []
        self._running = False
        self.batches = 0  # how many embed calls were made (for tests and benchmarks)
        self.solo_batches = 0  # how many of them ran on ``solo``

    @property
    def version(self) -> str:
        return self._embedder.version

    @property
    def dim(self) -> int:
        return self._embedder.dim

    async def embed_one(self, text: str) -> Row:
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._queue.append((text, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            if self._window_s > 0:
                await asyncio.sleep(self._window_s)
            while self._queue:
                batch, self._queue = (
                    self._queue[: self._max_batch],
                    self._queue[self._max_batch :],
                )
                texts = [text for text, _ in batch]
                embedder = self._embedder
                if self._solo is not None and len(texts) == 1 and not self._queue:
                    embedder = self._solo
                    self.solo_batches += 1
                began = self._clock()
                try:
                    vectors = await asyncio.to_thread(embedder.embed, texts)
                except Exception as exc:  # every waiter of the batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.batches += 1
                    if self._on_batch is not None:
                        self._on_batch(len(texts), self._clock() - began)
                for (_, future), row in zip(batch, vectors, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._running = False
