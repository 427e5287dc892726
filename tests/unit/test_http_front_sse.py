"""``sse.paced``: pings while the Gateway's stream is quiet, and how the handlers close it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import pytest

from services.http_front import sse


class Source:
    """A Gateway stream that says nothing for a long time."""

    def __init__(self) -> None:
        self.closed = False

    async def items(self) -> AsyncGenerator[int, None]:
        try:
            await asyncio.sleep(30)
            yield 1
        finally:
            self.closed = True  # the Gateway call's cancel


async def test_a_quiet_stream_yields_pings_and_then_its_items() -> None:
    async def two() -> AsyncIterator[int]:
        await asyncio.sleep(0.05)
        yield 1
        yield 2

    got = [item async for item in sse.paced(two(), 0.01)]
    assert got[-2:] == [1, 2] and set(got[:-2]) == {None} and got[:-2]


async def test_a_write_that_fails_while_a_read_is_pending_ends_with_its_own_error() -> None:
    """The handlers' shape: the pacer closes before the call it reads (its pending read
    cancelled), so the caller's failed write is the error, and the call is closed at once.
    Closing the call first, under the pacer's pending read, raised RuntimeError instead."""
    source = Source()
    with pytest.raises(ConnectionResetError):
        async with (
            aclosing(source.items()) as chunks,
            aclosing(sse.paced(chunks, 0.01)) as paced,
        ):
            async for chunk in paced:
                if chunk is None:
                    raise ConnectionResetError("Cannot write to closing transport")
    assert source.closed
