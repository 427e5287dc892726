"""The router's gRPC stubs, answered in this process by the services' own servicers.

``Calls`` in the router awaits ``stub.Method(request, timeout=..., metadata=...)`` and, for the
model, reads a server stream (``read``, ``async for``, ``cancel``). These adapters give the
same shapes, calling the servicer methods directly with a context whose ``abort`` raises the
``grpc.aio.AioRpcError`` a real channel would raise. No sockets, no threads of our own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc


class LocalContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use. The deadline is the
    caller's ``timeout``, whole: nothing in-process spends wall-clock time on the wire."""

    def __init__(self, timeout: float | None = None) -> None:
        self._timeout = timeout

    def time_remaining(self) -> float | None:
        return self._timeout

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    def set_code(self, code: grpc.StatusCode) -> None:
        raise NotImplementedError("the servicers abort instead")


class LocalUnary:
    def __init__(self, method: Callable[[Any, Any], Awaitable[Any]]) -> None:
        self._method = method

    async def __call__(self, request: Any, timeout: float | None = None, **_: Any) -> Any:  # noqa: ASYNC109 (a stub: grpc.aio's signature)
        return await self._method(request, LocalContext(timeout))


class LocalStream:
    """One server-streaming call in progress."""

    def __init__(self, chunks: AsyncIterator[Any]) -> None:
        self._chunks = chunks
        self._closing: set[asyncio.Future[Any]] = set()

    async def read(self) -> Any:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return grpc.aio.EOF

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks

    def cancel(self) -> bool:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            task = asyncio.ensure_future(close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return True


class LocalStreamMethod:
    def __init__(self, method: Callable[[Any, Any], AsyncIterator[Any]]) -> None:
        self._method = method

    def __call__(self, request: Any, timeout: float | None = None, **_: Any) -> LocalStream:
        return LocalStream(self._method(request, LocalContext(timeout)))


class SemanticStub:
    def __init__(self, servicer: Any) -> None:
        self.Lookup = LocalUnary(servicer.Lookup)
        self.Store = LocalUnary(servicer.Store)
        self.Release = LocalUnary(servicer.Release)


class PrefixStub:
    def __init__(self, servicer: Any) -> None:
        self.Plan = LocalUnary(servicer.Plan)
        self.Commit = LocalUnary(servicer.Commit)


class ModelStub:
    def __init__(self, servicer: Any) -> None:
        self.Generate = LocalStreamMethod(servicer.Generate)
