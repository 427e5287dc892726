"""A call a stopping router cut as it arrived (gRPC's CANCELLED, sent by the server before any
handler ran) is retried by the client as an UNAVAILABLE is: with the same request_id, so the
Gateway answers it once.

Measured: 40 calls of ``cachemesh.AsyncClient`` to a router SIGTERMed under them: 39 answered
(the rest waited for its restart), 1 failed ``CachemeshError: CANCELLED: CANCELLED``, a generic
error naming no request_id, where the HTTP front's caller is told to retry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, CachemeshError, Client, UnavailableError, build_request
from cachemesh._errors import from_rpc_error
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc


class CutOnce(gateway_pb2_grpc.GatewayServicer):
    """The first call of each request_id is cut with CANCELLED, as a stopping server does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.calls.append(request.request_id)
        if self.calls.count(request.request_id) == 1:
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        raise NotImplementedError  # not called here


@pytest.fixture
def gateway() -> Iterator[tuple[CutOnce, str]]:
    fake = CutOnce()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def test_a_cut_call_is_answered_on_its_retry(gateway: tuple[CutOnce, str]) -> None:
    fake, target = gateway
    with Client(target, api_key="k") as client:
        answer = client.complete(build_request("hi", model="sim-small"))
    assert answer.stop_reason == "end_turn"
    assert len(fake.calls) == 2 and fake.calls[0] == fake.calls[1] == answer.request_id


def test_an_async_cut_call_is_answered_on_its_retry(gateway: tuple[CutOnce, str]) -> None:
    fake, target = gateway

    async def ask() -> pb.CompleteResponse:
        async with AsyncClient(target, api_key="k") as client:
            return await client.complete(build_request("hi", model="sim-small"))

    assert asyncio.run(ask()).stop_reason == "end_turn"
    assert len(fake.calls) == 2 and fake.calls[0] == fake.calls[1]


def test_a_cut_call_not_retried_is_unavailable_with_its_request_id(
    gateway: tuple[CutOnce, str],
) -> None:
    """With ``max_attempts=1`` the cut reaches the caller: an ``UnavailableError`` naming the
    request_id to retry with, as an UNAVAILABLE is (was a generic ``CachemeshError`` naming
    none)."""
    fake, target = gateway
    with (
        Client(target, api_key="k", max_attempts=1) as client,
        pytest.raises(UnavailableError) as raised,
    ):
        client.complete(build_request("hi", model="sim-small"))
    assert raised.value.code == grpc.StatusCode.CANCELLED
    assert len(fake.calls) == 1 and raised.value.request_id == fake.calls[0]
    assert f"request_id {fake.calls[0]}" in str(raised.value)


class Waits(gateway_pb2_grpc.GatewayServicer):
    """Answers once ``done`` is set (the test's end): a call that waits."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.done.wait(10.0)
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        raise NotImplementedError  # not called here


def test_closing_your_own_client_while_a_call_waits_names_no_retry() -> None:
    """The caller closes its own Client while a call waits (another thread, e.g. on exit):
    gRPC's local CANCELLED ("Channel closed!") is no stopping router's cut, so it is no
    UnavailableError naming a request_id to retry with (it was, since 14322ca: the reviewer's
    client_close_cancel.py)."""
    fake = Waits()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = Client(f"127.0.0.1:{port}", api_key="k")
    closing = threading.Timer(0.3, client.close)
    closing.start()
    try:
        with pytest.raises(CachemeshError) as raised:
            client.ask("hi", model="sim-small", max_tokens=8)
    finally:
        closing.join()
        fake.done.set()
        server.stop(None)
    assert not isinstance(raised.value, UnavailableError)
    assert raised.value.code == grpc.StatusCode.CANCELLED
    assert "cancelled by this client" in str(raised.value)
    assert "request_id" not in str(raised.value)


def _cancelled(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )


@pytest.mark.parametrize(
    "details",
    ["Channel closed!", "Locally cancelled by application!", "Cancelled upon garbage collection!"],
)
def test_grpcs_local_cancels_are_not_the_gateways(details: str) -> None:
    error = from_rpc_error(_cancelled(details), "r1")
    assert type(error) is CachemeshError and "not by the Gateway" in str(error)
    cut = from_rpc_error(_cancelled("CANCELLED"), "r1")  # a stopping router's
    assert isinstance(cut, UnavailableError) and "request_id r1" in str(cut)
