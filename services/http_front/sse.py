"""Server-sent events: the frames, and pings while the Gateway has nothing to say."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

T = TypeVar("T")


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def data(value: Any) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


DONE = b"data: [DONE]\n\n"
COMMENT_PING = b": ping\n\n"  # OpenAI's stream has no ping event; SSE comments are ignored


async def paced(items: AsyncIterator[T], interval_s: float) -> AsyncGenerator[T | None, None]:
    """``items``, with a None whenever ``interval_s`` passes without one (time for a ping).
    The pending read is never cancelled by a ping, only when the consumer stops."""
    pending: asyncio.Future[T] = asyncio.ensure_future(anext(items))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(items))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        elif not pending.cancelled():
            # a read that ended (the Gateway's refusal) as the consumer stopped (a ping's
            # write failed): its failure is the consumer's to drop, not asyncio's to log
            pending.exception()
