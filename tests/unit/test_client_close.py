"""What ``Client.close()`` and ``AsyncClient.close()`` close: the channel the client made, never
one the caller passed in (``channel=``: the caller's to close, perhaps shared by other clients;
closing it broke them); and an ``AsyncClient`` closed from another event loop than the one its
channel belongs to is a RuntimeError saying where to close it: it returned without closing,
the channel and its connection left open. A fake Gateway in this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, Client
from cachemesh import _client as client_module
from cachemesh._tls import Options, Tls
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc

TIMEOUT_S = 10.0


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")


@pytest.fixture
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(FakeGateway(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _open(channel: grpc.Channel) -> bool:
    """Whether a call can still be made on ``channel`` (it is answered)."""
    try:
        gateway_pb2_grpc.GatewayStub(channel).Complete(pb.CompleteRequest(), timeout=TIMEOUT_S)
    except ValueError:  # gRPC's "Cannot invoke RPC on closed channel!"
        return False
    return True


async def _aio_open(channel: grpc.aio.Channel) -> bool:
    try:
        await gateway_pb2_grpc.GatewayStub(channel).Complete(
            pb.CompleteRequest(), timeout=TIMEOUT_S
        )
    except grpc.aio.UsageError:  # "Channel is closed."
        return False
    return True


def test_a_client_leaves_the_callers_channel_open_and_closes_its_own(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with grpc.insecure_channel(target) as channel:
        with Client(target, api_key="k", channel=channel) as client:
            client.ask("hi")
        assert _open(channel), "Client.close() closed the caller's channel"
        with Client(target, api_key="k", channel=channel) as again:  # another client of it
            assert again.ask("hi again").stop_reason == "end_turn"
    made: list[grpc.Channel] = []

    def spy(target: str, tls: Tls | None, options: Options = ()) -> grpc.Channel:
        made.append(grpc.insecure_channel(target, options=options))
        return made[-1]

    monkeypatch.setattr(client_module, "sync_channel", spy)
    with Client(target, api_key="k") as own:
        own.ask("hi")
    (channel,) = made
    assert not _open(channel), "the channel the Client made was left open"


def test_an_async_client_leaves_the_callers_channel_open(target: str) -> None:
    async def run() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            async with AsyncClient(target, api_key="k", channel=channel) as client:
                await client.ask("hi")
            return await _aio_open(channel)

    assert asyncio.run(run()), "AsyncClient.close() closed the caller's channel"


@pytest.fixture
def made_aio(monkeypatch: pytest.MonkeyPatch) -> list[grpc.aio.Channel]:
    """The aio channels AsyncClients make, as they make them."""
    made: list[grpc.aio.Channel] = []

    def spy(target: str, tls: Tls | None, options: Options = ()) -> grpc.aio.Channel:
        made.append(grpc.aio.insecure_channel(target, options=options))
        return made[-1]

    monkeypatch.setattr(client_module, "aio_channel", spy)
    return made


def test_an_async_client_closed_from_another_loop_says_where_to_close_it(
    target: str, made_aio: list[grpc.aio.Channel]
) -> None:
    """Its channel's loop runs in another thread (a server's loop, say): ``close()`` awaited
    in this thread's loop cannot close a channel of that loop, so it says where to, and the
    client stays open; closed in its own loop, it closes the channel."""
    owner = asyncio.new_event_loop()
    thread = threading.Thread(target=owner.run_forever, daemon=True)
    thread.start()
    try:
        client = AsyncClient(target, api_key="k")
        asyncio.run_coroutine_threadsafe(client.ask("hi"), owner).result(TIMEOUT_S)
        with pytest.raises(RuntimeError, match="belongs to another event loop") as raised:
            asyncio.run(client.close())  # another loop than the channel's
        assert "run_coroutine_threadsafe(client.close(), loop)" in str(raised.value)
        (channel,) = made_aio
        answer = asyncio.run_coroutine_threadsafe(client.ask("still open"), owner)
        assert answer.result(TIMEOUT_S).stop_reason == "end_turn"
        asyncio.run_coroutine_threadsafe(client.close(), owner).result(TIMEOUT_S)
        still = asyncio.run_coroutine_threadsafe(_aio_open(channel), owner).result(TIMEOUT_S)
        assert not still, "close() in its own loop left the channel open"
    finally:
        owner.call_soon_threadsafe(owner.stop)
        thread.join(TIMEOUT_S)
        owner.close()


def test_an_async_client_closed_from_another_loop_while_its_own_is_idle_says_where_to_close(
    target: str, made_aio: list[grpc.aio.Channel]
) -> None:
    """Its channel's loop neither runs nor has closed (``run_until_complete`` between uses):
    nothing can close the channel from here, so ``close()`` says so, and the client stays
    open; closed in its own loop, it closes the channel."""
    owner = asyncio.new_event_loop()
    try:
        client = AsyncClient(target, api_key="k")
        owner.run_until_complete(client.ask("hi"))
        with pytest.raises(RuntimeError, match="belongs to another event loop") as raised:
            asyncio.run(client.close())
        assert "run_until_complete(client.close())" in str(raised.value)
        (channel,) = made_aio
        assert owner.run_until_complete(client.ask("still open")).stop_reason == "end_turn"
        owner.run_until_complete(client.close())
        assert not owner.run_until_complete(_aio_open(channel))
    finally:
        owner.close()


def test_an_async_client_whose_loop_closed_closes_with_nothing_left_to_close(
    target: str,
) -> None:
    """The channel went with its loop (``asyncio.run`` then ``asyncio.run(client.close())``,
    the README's pattern): close() succeeds, and the client is closed."""
    client = AsyncClient(target, api_key="k")
    asyncio.run(client.ask("hi"))
    asyncio.run(client.close())
    with pytest.raises(RuntimeError, match="this AsyncClient is closed"):
        asyncio.run(client.ask("hi"))
    # the closed loop's channel is let go: it held its connection while the client kept it
    assert client._channel is None


def test_closing_a_closed_async_client_is_nothing_from_any_loop(
    target: str, made_aio: list[grpc.aio.Channel]
) -> None:
    """A second close() (``finally`` and ``__aexit__`` both) in another loop than the channel's
    raised that the channel belongs to another loop, though it was closed."""
    owner = asyncio.new_event_loop()
    try:
        client = AsyncClient(target, api_key="k")
        owner.run_until_complete(client.ask("hi"))
        owner.run_until_complete(client.close())
        asyncio.run(client.close())
        owner.run_until_complete(client.close())
    finally:
        owner.close()
