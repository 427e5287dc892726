"""``sse.paced``: pings while the Gateway's stream is quiet, and how the handlers close it."""

from __future__ import annotations

import asyncio
import gc
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


async def test_a_read_that_failed_as_the_pacer_closed_is_not_left_unretrieved() -> None:
    """The Gateway's refusal lands while the pacer's consumer writes a ping that fails (the
    caller went away): the pacer closes with its pending read done, failed. That failure was
    left unretrieved: asyncio logged it at ERROR ("Task exception was never retrieved", the
    refusal's message) for an ordinary caller gone."""
    release = asyncio.Event()
    raised = asyncio.Event()

    async def refused() -> AsyncGenerator[int, None]:
        await release.wait()
        raised.set()
        raise RuntimeError("the Gateway's refusal")
        yield 1  # an async generator

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        with pytest.raises(ConnectionResetError):
            async with aclosing(sse.paced(refused(), 0.01)) as paced:
                async for chunk in paced:
                    assert chunk is None  # a ping: the read is pending
                    release.set()
                    await raised.wait()
                    await asyncio.sleep(0)  # the read's task ends with the refusal
                    raise ConnectionResetError("Cannot write to closing transport")
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [context.get("message") for context in reported] == []
