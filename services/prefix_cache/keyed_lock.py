"""One asyncio lock per key, held only while someone uses it.

The commits of one request id must not interleave (a retry racing its first attempt reads the
record, then writes it); commits of different requests need no order between them, and with a
durable Redis each write waits for an fsync, so a single process-wide lock made every commit
wait for every other's fsyncs in turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        """The keys held or waited for (0 when idle: nothing is kept)."""
        return len(self._locks)
