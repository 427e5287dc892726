"""A model call's stream read ahead of its caller.

The router reads a model's chunks in their own task as the model writes them, into a buffer
bounded by the call's ``max_tokens`` (an answer is at most that many tokens: the model's own
bound), while the request's generator hands them on as its caller takes them. A caller that
reads slowly (a small receive window, a busy client) then holds the router's write, not the
model call: the call ends on the model's time, within its deadline (``ROUTER_MODEL_TIMEOUT_S``),
and is billed by its end; its replica's slot is freed, and its signs of life (``arrived``) are
seen as they come. Past the bound (an answer of many small pieces) the reading waits for the
caller, as gRPC's flow control would.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from cachemesh.v1 import model_pb2

# chunks beyond max_tokens a buffer may hold (the start, the end, a few progress chunks)
SLACK_CHUNKS = 64

Chunk = model_pb2.GenerateChunk


class ReadAhead:
    """``read`` is the stream's next chunk (None at its end) and when it came, on ``clock``;
    ``arrived`` is told of each chunk as it comes. ``close`` stops the reading (the stream
    itself is its owner's to cancel)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Chunk | None]],
        bound: int,
        clock: Callable[[], float],
        arrived: Callable[[Chunk, float], None],
    ) -> None:
        self._read = read
        self._bound = max(bound, 1) + SLACK_CHUNKS
        self._clock = clock
        self._arrived = arrived
        self._items: deque[tuple[Chunk | None, float] | BaseException] = deque()
        self._more = asyncio.Event()  # an item was added
        self._room = asyncio.Event()  # an item was taken
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                while len(self._items) >= self._bound:
                    self._room.clear()
                    await self._room.wait()
                chunk = await self._read()
                at = self._clock()
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

    async def read(self) -> tuple[Chunk | None, float]:
        while not self._items:
            if self._task.done():  # ended with no item left (cancelled): nothing more comes
                return None, self._clock()
            self._more.clear()
            await self._more.wait()
        item = self._items.popleft()
        self._room.set()
        if isinstance(item, BaseException):
            raise item
        return item

    def left(self) -> list[Chunk]:
        """The chunks read and not taken (after ``close``: those its caller never will)."""
        return [item[0] for item in self._items if isinstance(item, tuple) and item[0] is not None]

    def close(self) -> None:
        self._task.cancel()


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
