"""A model call's stream read ahead of its caller.

The router reads a model's chunks in their own task as the model writes them, into a buffer,
while the request's generator hands them on as its caller takes them. A caller that reads
slowly (a small receive window, a busy client) then holds the router's write, not the model
call: the call ends on the model's time, within its deadline (``ROUTER_MODEL_TIMEOUT_S``), and
is billed by its end; its replica's slot is freed when its end comes, and its signs of life
(``arrived``) are seen as they come.

The buffer is bounded by the call's ``max_tokens`` (an answer is at most that many tokens),
by ``CALL_MAX_BYTES`` a call, and by a budget all calls share (``ReadAheadBudget``,
``ROUTER_READ_AHEAD_MAX_BYTES``), in bytes a chunk takes in memory (its payload and
``CHUNK_OVERHEAD_BYTES``). Past any of them the reading waits for the caller, as gRPC's flow
control would; a call whose caller took every chunk still reads its next one, so a caller
that keeps up is never held by others that do not (each call holds at most one chunk past
the budget, as the router did before it read ahead).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from cachemesh.v1 import model_pb2

# chunks beyond max_tokens a buffer may hold (the start, the end, a few progress chunks)
SLACK_CHUNKS = 64
# what a chunk takes in memory beyond its payload (the message object, its place in the
# buffer: ~690 B measured of a one-token chunk's RSS, 176 B of it on Python's heap)
CHUNK_OVERHEAD_BYTES = 512
# a call's buffer: ~2,000 one-token chunks, an answer a slow reader takes minutes over
CALL_MAX_BYTES = 1024 * 1024

Chunk = model_pb2.GenerateChunk


def chunk_bytes(chunk: Chunk | None) -> int:
    """What ``chunk`` is counted at in a buffer (the stream's end: nothing)."""
    return 0 if chunk is None else chunk.ByteSize() + CHUNK_OVERHEAD_BYTES


class ReadAheadBudget:
    """The bytes the router's read-ahead buffers hold together, at most ``max_bytes`` (past
    it, only calls whose callers took every chunk read on). One a router, shared by its
    calls."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._freed = asyncio.Event()

    @property
    def room(self) -> bool:
        return self.held < self.max_bytes

    def take(self, size: int) -> None:
        self.held += size

    def give(self, size: int) -> None:
        full = not self.room
        self.held -= size
        if full and self.room:  # the calls waiting on a full budget read on
            freed, self._freed = self._freed, asyncio.Event()
            freed.set()

    async def freed(self) -> None:
        """Returns once the full budget has room again."""
        await self._freed.wait()


async def _either(one: Awaitable[object], other: Awaitable[object]) -> None:
    """Returns once ``one`` or ``other`` has (the other cancelled)."""
    waits = {asyncio.ensure_future(one), asyncio.ensure_future(other)}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class ReadAhead:
    """``read`` is the stream's next chunk (None at its end) and when it came, on ``clock``;
    ``arrived`` is told of each chunk as it comes. ``bound``: the call's ``max_tokens``;
    ``budget``: the router's. ``close`` stops the reading and gives its bytes back to the
    budget (the stream itself is its owner's to cancel)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Chunk | None]],
        bound: int,
        clock: Callable[[], float],
        arrived: Callable[[Chunk, float], None],
        budget: ReadAheadBudget,
        max_bytes: int = CALL_MAX_BYTES,
    ) -> None:
        self._read = read
        self._bound = max(bound, 1) + SLACK_CHUNKS
        self._clock = clock
        self._arrived = arrived
        self._budget = budget
        self._max_bytes = max_bytes
        self.held = 0  # the bytes of its chunks in the buffer, in ``budget``
        self._closed = False
        self._items: deque[tuple[Chunk | None, float] | BaseException] = deque()
        self._more = asyncio.Event()  # an item was added
        self._room = asyncio.Event()  # an item was taken
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                await self._wait_for_room()
                chunk = await self._read()
                at = self._clock()
                size = chunk_bytes(chunk)
                self.held += size
                self._budget.take(size)
                self._items.append((chunk, at))
                self._more.set()
                if chunk is None:
                    return
                self._arrived(chunk, at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the caller's to raise, in its turn after the chunks before
            self._items.append(exc)
            self._more.set()

    async def _wait_for_room(self) -> None:
        """Until the buffer is empty (its caller waits) or within its bounds and the
        budget's."""
        while self._items:
            if len(self._items) >= self._bound or self.held >= self._max_bytes:
                self._room.clear()
                await self._room.wait()
            elif not self._budget.room:  # until the budget has room or its caller took all
                self._room.clear()
                await _either(self._budget.freed(), self._room.wait())
            else:
                return

    async def read(self) -> tuple[Chunk | None, float]:
        while not self._items:
            if self._task.done():  # ended with no item left (cancelled): nothing more comes
                return None, self._clock()
            self._more.clear()
            await self._more.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._room.set()
            raise item
        self._given(chunk_bytes(item[0]))
        self._room.set()
        return item

    def _given(self, size: int) -> None:
        if not self._closed:  # a closed one gave all its bytes back
            self.held -= size
            self._budget.give(size)

    def left(self) -> list[Chunk]:
        """The chunks read and not taken (after ``close``: those its caller never will)."""
        return [item[0] for item in self._items if isinstance(item, tuple) and item[0] is not None]

    def close(self) -> None:
        self._task.cancel()
        if not self._closed:
            self._budget.give(self.held)
            self.held = 0
            self._closed = True


class ReadInTurn:
    """``ReadAhead``'s interface with no task of its own: each chunk read when its caller asks
    (an offline replay, whose caller takes each chunk as it comes and whose virtual clock
    would count a request waiting on another task as running, never idle)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Chunk | None]],
        clock: Callable[[], float],
        arrived: Callable[[Chunk, float], None],
    ) -> None:
        self._read = read
        self._clock = clock
        self._arrived = arrived

    async def read(self) -> tuple[Chunk | None, float]:
        chunk = await self._read()
        at = self._clock()
        if chunk is not None:
            self._arrived(chunk, at)
        return chunk, at

    def left(self) -> list[Chunk]:
        return []

    def close(self) -> None:
        return None
