"""What the Python client sends, against a fake Gateway (a real gRPC server in this process):
the retry mark on a call with the caller's own request id (never on an id the client made)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []  # each call's, in order

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        self.metadata.append(dict(context.invocation_metadata()))
        yield pb.CompleteChunk(start=pb.CompleteResponse(model="sim-small"))
        yield pb.CompleteChunk(end=pb.CompleteResponse(stop_reason="end_turn"))


@pytest.fixture
def gateway() -> Iterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def _every_call(target: str, request: pb.CompleteRequest) -> None:
    """``request`` through Client and AsyncClient, complete and stream."""
    with Client(target, api_key="k") as client:
        client.complete(request)
        list(client.stream(request))

    async def aio() -> None:
        async with AsyncClient(target, api_key="k") as client:
            await client.complete(request)
            _ = [chunk async for chunk in client.stream(request)]

    asyncio.run(aio())


def test_a_call_with_the_callers_own_request_id_is_marked_a_possible_retry(
    gateway: tuple[FakeGateway, str],
) -> None:
    """The router reads the answer ledger the routers share only for a marked call: a caller's
    retry that reaches another router is answered from it and billed once."""
    fake, target = gateway
    _every_call(target, build_request("hi", request_id="order-42"))
    assert [m.get("cachemesh-retry") for m in fake.metadata] == ["1"] * 4


def test_a_call_whose_request_id_the_client_made_is_not_marked(
    gateway: tuple[FakeGateway, str],
) -> None:
    """A new id is in no ledger: no Redis read for it (gRPC's own retries are marked by gRPC)."""
    fake, target = gateway
    _every_call(target, build_request("hi"))
    assert len(fake.metadata) == 4
    assert all("cachemesh-retry" not in m for m in fake.metadata)
