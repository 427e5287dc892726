"""The typed clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, cast

import grpc

from cachemesh._auth import bearer_metadata
from cachemesh._channel import (
    DEFAULT_TIMEOUT_S,
    MAX_ATTEMPTS,
    Reached,
    call_metadata,
    channel_options,
    deadline_s,
    default_deadline_s,
    with_request_id,
)
from cachemesh._errors import from_rpc_error, incomplete
from cachemesh._requests import build_request
from cachemesh._tls import Tls, aio_channel, refuse_plaintext, sync_channel
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

# gRPC's own ValueError for a call started on a closed channel (a unary call's, a stream's): a
# call that passed the Client's closed check as another thread closed it, or on an injected
# channel its owner closed. The closed Client's RuntimeError instead, as AsyncClient's
_CLOSED_CHANNEL = frozenset(
    {"Cannot invoke RPC on closed channel!", "Cannot invoke RPC: Channel closed!"}
)


_CLOSED_AS_STARTED = "this Client is closed (its channel closed as the call started)"


def _attempts(
    target: str, channel: object, tls: Tls | None, max_attempts: int | None, insecure: bool
) -> int:
    """The ``max_attempts`` of the channel a client makes (5 unless given). With ``channel``
    given, ``tls``, ``max_attempts`` or ``insecure`` is a ValueError: they set up the channel
    the client makes, and a channel given is used as it is (they were ignored: plaintext sent
    where TLS was asked for). A channel made in plaintext to a target that is not loopback is
    a ValueError unless ``insecure`` (the API key would cross the network in cleartext)."""
    given = [f"{name}=" for name, value in (("tls", tls), ("max_attempts", max_attempts))
             if value is not None] + (["insecure="] if insecure else [])  # fmt: skip
    if channel is not None and given:
        raise ValueError(
            f"{' and '.join(given)} cannot be used with channel=: they set up the channel the "
            "client makes; make yours with them (grpc.secure_channel(target, "
            "Tls(...).credentials(), options=cachemesh.channel_options(max_attempts=...)))"
        )
    if channel is None:
        refuse_plaintext(target, tls, insecure, "API key")
    return MAX_ATTEMPTS if max_attempts is None else max_attempts


class ChunkStream(Iterator[pb.CompleteChunk]):
    """The chunks of one ``Client.stream`` call, the last one its ``end``; a stream that stops
    before it raises ``UnavailableError`` (never an incomplete answer taken for a whole one).
    The call starts at the first read. ``close()``, or leaving ``with client.stream(r) as
    chunks:``, cancels it: the Gateway stops generating and bills what it produced. A bare
    ``break`` out of a stream still held (by a name, or the ``with`` target before the block
    ends) does not cancel it until it is closed or garbage-collected."""

    def __init__(
        self, start: Callable[[], Any], request_id: str, reached: Reached | None = None
    ) -> None:
        self._start = start
        self._call: Any = None  # gRPC's call: an iterator of the chunks, and cancel()
        self._request_id = request_id
        self._reached = reached or Reached(True)
        self._ended = False  # the ``end`` chunk came
        self._done = False  # nothing more to read: ended, failed or closed
        self._closed = False  # close() was called (perhaps while another thread read)

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> pb.CompleteChunk:
        if self._done:
            raise StopIteration
        if self._call is None:
            try:
                self._call = self._start()
            except ValueError as error:
                if str(error) not in _CLOSED_CHANNEL:
                    raise
                self._done = True
                raise RuntimeError(_CLOSED_AS_STARTED) from error
            if self._closed:  # closed by another thread as it started: close() saw no call
                self._call.cancel()
                raise StopIteration
        try:
            chunk: pb.CompleteChunk = next(self._call)
        except StopIteration:
            self._done = True
            if not self._ended and not self._closed:
                raise incomplete(self._request_id) from None
            raise
        except grpc.RpcError as error:
            self._done = True
            if self._closed:  # closed by its owner while this read waited: it just ends
                raise StopIteration from None
            self._reached.failed(error)
            raise from_rpc_error(error, self._request_id) from error
        self._reached.answered()
        self._ended = chunk.WhichOneof("part") == "end"
        return chunk

    def close(self) -> None:
        """Cancels the call (a no-op once it has ended); the stream yields nothing more, also
        to a read waiting in another thread (it ends, with no error)."""
        self._closed = True
        self._done = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncChunkStream(AsyncIterator[pb.CompleteChunk]):
    """As :class:`ChunkStream`, for ``AsyncClient.stream``: ``aclose()``, leaving ``async with
    client.stream(r) as chunks:`` or ``contextlib.aclosing`` cancels the call."""

    def __init__(
        self, start: Callable[[], Any], request_id: str, reached: Reached | None = None
    ) -> None:
        self._start = start
        self._call: Any = None  # gRPC's aio call: read() and cancel()
        self._loop: asyncio.AbstractEventLoop | None = None  # the call's, once started
        self._request_id = request_id
        self._reached = reached or Reached(True)
        self._ended = False
        self._done = False
        self._closed = False  # aclose() was called (perhaps while another task read)

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> pb.CompleteChunk:
        if self._done:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._start()
            self._loop = asyncio.get_running_loop()
        try:
            chunk = await self._call.read()
        except grpc.RpcError as error:
            self._done = True
            if self._closed:  # closed by its owner while this read waited: it just ends
                raise StopAsyncIteration from None
            self._reached.failed(error)
            raise from_rpc_error(error, self._request_id) from error
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                raise StopAsyncIteration from None  # the call was cancelled, not this task
            await self.aclose()  # the reading task was cancelled: so is the call
            raise
        if chunk is grpc.aio.EOF:
            self._done = True
            if not self._ended and not self._closed:
                raise incomplete(self._request_id)
            raise StopAsyncIteration
        self._reached.answered()
        self._ended = chunk.WhichOneof("part") == "end"
        return cast(pb.CompleteChunk, chunk)

    async def aclose(self) -> None:
        """Cancels the call (a no-op once it has ended); the stream yields nothing more, also
        to a read waiting in another task (it ends, with no error)."""
        self._closed = True
        self._done = True
        if self._call is not None:
            self._call.cancel()

    def __del__(self) -> None:
        # dropped unclosed (``break`` out of ``async for chunk in client.stream(r)``): gRPC's
        # aio call is held in cycles by its own tasks, so it would run on until collected.
        # The cancel runs on the call's loop: a collection may happen on another thread.
        if self._call is None or self._done or self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: so did its calls
            self._loop.call_soon_threadsafe(self._call.cancel)

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Client:
    """A blocking client of the Gateway; ``tls`` for a Gateway serving TLS (``Tls(ca_file=...)``).
    ``channel`` may be injected (tests; make it with ``cachemesh.channel_options()`` to keep
    the retries): it is used as it is, so ``tls`` or ``max_attempts`` with it is a ValueError
    (``wait_for_ready`` holds, per call), and it stays the caller's: ``close()`` leaves it
    open (close it yourself; other clients may share it).

    Each call gets a ``request_id`` unless it has one (an error carries it: retry with it and
    an answer the Gateway made is served again, billed once, on any router sharing the answer
    ledger, while a call that failed or was cut at its deadline made none: the retry is a new
    billed call; a call with the caller's own id is marked as a possible retry), and
    UNAVAILABLE is retried by gRPC (up to ``max_attempts``, 5; 1 = no retry) while nothing has
    come back; ``wait_for_ready`` (default) lets a call wait, within ``timeout_s``, for a
    Gateway that is restarting instead of failing at once, once the Gateway has answered on this
    client (until then a wrong address or TLS setting fails once gRPC's retries are spent,
    about 4 s, naming gRPC's reason).
    A ``target`` that is not loopback (nor a Unix socket) without ``tls`` is a ValueError
    unless ``insecure=True``: the key would cross the network in cleartext with every call.
    ``api_key`` is sent without surrounding whitespace; one gRPC cannot send (a space, a control
    or non-ASCII character) is a ValueError. ``timeout_s``: each call's deadline in seconds
    (120; any real number over 0, at most a day), None for no deadline (as before 59fbb2d: the
    router's ``ROUTER_MODEL_TIMEOUT_S`` still ends a model call); a call's own ``timeout_s``
    overrides it, None there meaning the client's."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
        tls: Tls | None = None,
        wait_for_ready: bool = True,
        max_attempts: int | None = None,
        insecure: bool = False,
    ) -> None:
        self._metadata = bearer_metadata(api_key, "api_key")  # before a channel is opened
        self._timeout_s = default_deadline_s(timeout_s)
        attempts = _attempts(target, channel, tls, max_attempts, insecure)
        self._owns_channel = channel is None  # one passed in is the caller's to close
        self._channel = (
            channel
            if channel is not None
            else sync_channel(target, tls, channel_options(wait_for_ready, attempts))
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._reached = Reached(wait_for_ready)
        self._closed = False

    def _gateway(self) -> gateway_pb2_grpc.GatewayStub:
        """The stub; a RuntimeError once the client is closed (gRPC's own was a ValueError,
        "Cannot invoke RPC on closed channel!", as AsyncClient's is this RuntimeError)."""
        if self._closed:
            raise RuntimeError("this Client is closed")
        return self._stub

    def complete(
        self, request: pb.CompleteRequest, *, timeout_s: float | None = None
    ) -> pb.CompleteResponse:
        """The answer to ``request``; ``timeout_s``: this call's deadline in seconds (the
        client's ``timeout_s`` when None)."""
        timeout = self._timeout_s if timeout_s is None else deadline_s(timeout_s)
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        try:
            response: pb.CompleteResponse = self._gateway().Complete(
                sent,
                metadata=metadata,
                timeout=timeout,
                wait_for_ready=self._reached.wait_for_ready(),
            )
        except grpc.RpcError as error:
            self._reached.failed(error)
            raise from_rpc_error(error, sent.request_id) from error
        except ValueError as error:
            if str(error) not in _CLOSED_CHANNEL:
                raise
            raise RuntimeError(_CLOSED_AS_STARTED) from error
        self._reached.answered()
        return response

    def stream(self, request: pb.CompleteRequest, *, timeout_s: float | None = None) -> ChunkStream:
        """The answer's chunks, the last one its ``end``, as a :class:`ChunkStream`: use it in
        ``with client.stream(request) as chunks:`` (leaving the block cancels the call) or
        iterate it and ``close()`` it. ``timeout_s``: the whole stream's deadline, from its
        first read (the client's ``timeout_s`` when None)."""
        timeout = self._timeout_s if timeout_s is None else deadline_s(timeout_s)
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        return ChunkStream(
            lambda: self._gateway().StreamComplete(
                sent,
                metadata=metadata,
                timeout=timeout,
                wait_for_ready=self._reached.wait_for_ready(),
            ),
            sent.request_id,
            self._reached,
        )

    def ask(
        self,
        question: str,
        *,
        model: str = "auto",
        max_tokens: int = 512,
        system: str | None = None,
        namespace: str = "",
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> pb.CompleteResponse:
        """One user question; build a request with :func:`cachemesh.build_request` for more.
        ``request_id``: an error's, to retry the same question with it (answered and billed
        once); a new one is made when empty."""
        request = build_request(
            question,
            model=model,
            max_tokens=max_tokens,
            system=system,
            namespace=namespace,
            request_id=request_id,
        )
        return self.complete(request, timeout_s=timeout_s)

    def close(self) -> None:
        """Closes the client: a later call is a RuntimeError. The channel it made is closed
        (a call waiting on it ends, a plain ``CachemeshError``); one passed in as ``channel``
        is left open, the caller's (a call waiting on it runs on until the caller closes it)."""
        self._closed = True
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """An asyncio client of the Gateway; ``tls``, request ids, retries and waiting as for
    ``Client``. It may be made outside a running event loop (at import time, in a sync
    ``main``): its channel opens on first use, in the loop using it (gRPC's aio channels belong
    to one loop), and again in a later loop once that one has closed (a second
    ``asyncio.run``). A call from another loop while the first has not closed is a
    RuntimeError: one AsyncClient per event loop. An injected ``channel`` is used as it is,
    and stays the caller's: ``close()`` leaves it open."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        channel: grpc.aio.Channel | None = None,
        tls: Tls | None = None,
        wait_for_ready: bool = True,
        max_attempts: int | None = None,
        insecure: bool = False,
    ) -> None:
        self._metadata = bearer_metadata(api_key, "api_key")  # before a channel is opened
        self._timeout_s = default_deadline_s(timeout_s)
        attempts = _attempts(target, channel, tls, max_attempts, insecure)
        if tls is not None:
            tls.credentials()  # a file that cannot be read: now, not at the first call
        options = channel_options(wait_for_ready, attempts)
        # the client's own channel opens in the loop that uses it (None: injected, as it is)
        self._open: Callable[[], grpc.aio.Channel] | None = (
            None if channel is not None else lambda: aio_channel(target, tls, options)
        )
        self._channel = channel
        self._stub: gateway_pb2_grpc.GatewayAsyncStub | None = (
            None if channel is None else gateway_pb2_grpc.GatewayStub(channel)
        )
        self._loop: asyncio.AbstractEventLoop | None = None  # the one its channel opened in
        self._closed = False
        self._reached = Reached(wait_for_ready)

    def _gateway(self) -> gateway_pb2_grpc.GatewayAsyncStub:
        """The stub, on a channel of the running loop (opened now when there is none yet, or
        the one there is belongs to a loop that has closed)."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._open is not None and self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(
                    "this AsyncClient's channel was opened in another event loop, which has "
                    "not closed (gRPC's aio channels belong to one loop): make one AsyncClient "
                    "per event loop"
                )
            self._channel = self._open()  # the closed loop's channel went with it
            self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
            self._loop = loop
        assert self._stub is not None  # made above, or injected
        return self._stub

    async def complete(
        self, request: pb.CompleteRequest, *, timeout_s: float | None = None
    ) -> pb.CompleteResponse:
        """As ``Client.complete``: ``timeout_s`` is this call's deadline (None: the client's)."""
        timeout = self._timeout_s if timeout_s is None else deadline_s(timeout_s)
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        try:
            response: pb.CompleteResponse = await self._gateway().Complete(
                sent,
                metadata=metadata,
                timeout=timeout,
                wait_for_ready=self._reached.wait_for_ready(),
            )
        except grpc.RpcError as error:
            self._reached.failed(error)
            raise from_rpc_error(error, sent.request_id) from error
        self._reached.answered()
        return response

    def stream(
        self, request: pb.CompleteRequest, *, timeout_s: float | None = None
    ) -> AsyncChunkStream:
        """As ``Client.stream``, an :class:`AsyncChunkStream`: ``async with client.stream(r)
        as chunks:``, or ``async for`` over it and ``aclose()`` it."""
        timeout = self._timeout_s if timeout_s is None else deadline_s(timeout_s)
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        return AsyncChunkStream(
            lambda: self._gateway().StreamComplete(
                sent,
                metadata=metadata,
                timeout=timeout,
                wait_for_ready=self._reached.wait_for_ready(),
            ),
            sent.request_id,
            self._reached,
        )

    async def ask(
        self,
        question: str,
        *,
        model: str = "auto",
        max_tokens: int = 512,
        system: str | None = None,
        namespace: str = "",
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> pb.CompleteResponse:
        request = build_request(
            question,
            model=model,
            max_tokens=max_tokens,
            system=system,
            namespace=namespace,
            request_id=request_id,
        )
        return await self.complete(request, timeout_s=timeout_s)

    async def close(self) -> None:
        """Closes the client (a later call is a RuntimeError) and the channel it made, in the
        loop the channel belongs to; a channel opened in a loop that has closed cannot be
        closed, and is let go (its connection with the last reference); one passed in as
        ``channel`` is left open, the caller's. Awaited in another loop while the channel's has
        not closed, it is a RuntimeError and the client stays open: a gRPC channel is closed in
        its own loop (await ``close()`` there, or close that loop first). Closing a closed
        client is nothing."""
        channel, loop = self._channel, self._loop
        if self._closed:
            return  # closed already (a second close, from any loop, is nothing)
        if self._open is None or channel is None or loop is None or loop.is_closed():
            self._closed = True  # injected (the caller's), never opened, or its loop closed
            if self._open is not None:  # a channel of a closed loop: its socket is let go
                self._channel = self._stub = None  # with the last reference to it
            return
        if loop is not asyncio.get_running_loop():
            raise RuntimeError(
                "this AsyncClient's channel belongs to another event loop: await close() in "
                "that loop (e.g. loop.run_until_complete(client.close()), or "
                "asyncio.run_coroutine_threadsafe(client.close(), loop) while it runs in "
                "another thread), or close that loop first (close() then lets its channel go)"
            )
        self._closed = True
        await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
