"""The typed clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import TracebackType

import grpc

from cachemesh._auth import bearer_metadata
from cachemesh._channel import MAX_ATTEMPTS, call_metadata, channel_options, with_request_id
from cachemesh._errors import from_rpc_error, incomplete
from cachemesh._requests import build_request
from cachemesh._tls import Tls, aio_channel, sync_channel
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


class Client:
    """A blocking client of the Gateway; ``tls`` for a Gateway serving TLS (``Tls(ca_file=...)``).
    ``channel`` may be injected (tests; make it with ``cachemesh.channel_options()`` to keep
    the retries).

    Each call gets a ``request_id`` unless it has one (an error carries it: retry with it and
    the Gateway answers and bills the request once, on any router sharing the answer ledger: a
    call with the caller's own id is marked as a possible retry), and UNAVAILABLE is retried by
    gRPC (up to ``max_attempts``, 5; 1 = no retry) while nothing has come back;
    ``wait_for_ready`` (default) lets a call wait, within ``timeout_s``, for a Gateway that is
    restarting instead of failing at once. ``api_key`` is sent without surrounding whitespace;
    one gRPC cannot send (a space, a control or non-ASCII character) is a ValueError."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str,
        timeout_s: float = 120.0,
        channel: grpc.Channel | None = None,
        tls: Tls | None = None,
        wait_for_ready: bool = True,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self._metadata = bearer_metadata(api_key, "api_key")  # before a channel is opened
        self._channel = channel or sync_channel(
            target, tls, channel_options(wait_for_ready, max_attempts)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout_s = timeout_s

    def complete(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        try:
            response: pb.CompleteResponse = self._stub.Complete(
                sent, metadata=metadata, timeout=self._timeout_s
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, sent.request_id) from error
        return response

    def stream(self, request: pb.CompleteRequest) -> Iterator[pb.CompleteChunk]:
        """The answer's chunks, the last one its ``end``; a stream that stops before it raises
        ``UnavailableError`` (never an incomplete answer taken for a whole one). Stopping
        reading (``break``, ``close()``) cancels the call: the Gateway stops generating."""
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        ended = False
        try:
            for chunk in self._stub.StreamComplete(
                sent, metadata=metadata, timeout=self._timeout_s
            ):
                ended = chunk.WhichOneof("part") == "end"
                yield chunk
        except grpc.RpcError as error:
            raise from_rpc_error(error, sent.request_id) from error
        if not ended:
            raise incomplete(sent.request_id)

    def ask(
        self,
        question: str,
        *,
        model: str = "auto",
        max_tokens: int = 512,
        system: str | None = None,
        namespace: str = "",
    ) -> pb.CompleteResponse:
        """One user question; build a request with :func:`cachemesh.build_request` for more."""
        request = build_request(
            question, model=model, max_tokens=max_tokens, system=system, namespace=namespace
        )
        return self.complete(request)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """An asyncio client of the Gateway; ``tls``, request ids, retries and waiting as for
    ``Client``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str,
        timeout_s: float = 120.0,
        channel: grpc.aio.Channel | None = None,
        tls: Tls | None = None,
        wait_for_ready: bool = True,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self._metadata = bearer_metadata(api_key, "api_key")  # before a channel is opened
        self._channel = channel or aio_channel(
            target, tls, channel_options(wait_for_ready, max_attempts)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout_s = timeout_s

    async def complete(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        try:
            response: pb.CompleteResponse = await self._stub.Complete(
                sent, metadata=metadata, timeout=self._timeout_s
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, sent.request_id) from error
        return response

    async def stream(self, request: pb.CompleteRequest) -> AsyncIterator[pb.CompleteChunk]:
        """As ``Client.stream``; stopping reading cancels the call when the generator is
        closed: at once with ``contextlib.aclosing`` or ``aclose()``, soon after a ``break``
        (when the event loop finalises it)."""
        sent = with_request_id(request)
        metadata = call_metadata(self._metadata, request)
        call = self._stub.StreamComplete(sent, metadata=metadata, timeout=self._timeout_s)
        ended = False
        try:
            async for chunk in call:
                ended = chunk.WhichOneof("part") == "end"
                yield chunk
        except grpc.RpcError as error:
            raise from_rpc_error(error, sent.request_id) from error
        finally:
            # a caller that stopped reading (break, aclose): end the RPC, so the Gateway stops
            # the model call and bills what it produced (no-op once the stream has ended)
            call.cancel()
        if not ended:
            raise incomplete(sent.request_id)

    async def ask(
        self,
        question: str,
        *,
        model: str = "auto",
        max_tokens: int = 512,
        system: str | None = None,
        namespace: str = "",
    ) -> pb.CompleteResponse:
        request = build_request(
            question, model=model, max_tokens=max_tokens, system=system, namespace=namespace
        )
        return await self.complete(request)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
