"""A call's deadline, against a fake Gateway (a real gRPC server in this process): the client's
``timeout_s`` and a call's own (``complete``, ``stream``, ``ask``, blocking and asyncio) reach
the Gateway as the call's deadline; one gRPC cannot keep (0, negative, nan, inf, past a day) is
a ValueError naming it before anything is sent. gRPC took such a deadline as passed already:
the call failed at once as a DeadlineExceededError telling the caller it was billed for what
the model produced, with no call made (``timeout_s=float("inf")``, meant as no deadline, too)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, Client, build_request
from cachemesh.admin import AdminClient
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.remaining: list[float] = []  # each call's deadline as the Gateway saw it, in s

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.remaining.append(context.time_remaining())
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        self.remaining.append(context.time_remaining())
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


UNKEPT = [0.0, -1.0, math.nan, math.inf, 1e10]


@pytest.mark.parametrize("timeout_s", UNKEPT)
def test_a_client_deadline_grpc_cannot_keep_is_refused_naming_it(
    gateway: tuple[FakeGateway, str], timeout_s: float
) -> None:
    fake, target = gateway
    with (
        pytest.raises(ValueError, match=r"timeout_s must be a number of seconds over 0"),
        Client(target, api_key="k", timeout_s=timeout_s) as client,
    ):
        client.complete(build_request("hi"))
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds over 0"):
        AsyncClient(target, api_key="k", timeout_s=timeout_s)
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds over 0"):
        AdminClient(target, admin_token="t", timeout_s=timeout_s)
    assert fake.remaining == []  # no call was made


@pytest.mark.parametrize("timeout_s", UNKEPT)
def test_a_calls_deadline_grpc_cannot_keep_is_refused_naming_it(
    gateway: tuple[FakeGateway, str], timeout_s: float
) -> None:
    fake, target = gateway
    request = build_request("hi")
    with Client(target, api_key="k") as client:
        for call in (
            lambda: client.complete(request, timeout_s=timeout_s),
            lambda: client.stream(request, timeout_s=timeout_s),
            lambda: client.ask("hi", timeout_s=timeout_s),
        ):
            with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds"):
                call()
    assert fake.remaining == []


def test_a_calls_own_deadline_reaches_the_gateway(gateway: tuple[FakeGateway, str]) -> None:
    fake, target = gateway
    request = build_request("hi")
    with Client(target, api_key="k", timeout_s=60) as client:
        client.complete(request)  # the client's
        client.complete(request, timeout_s=5)
        list(client.stream(request, timeout_s=5))
        client.ask("hi", timeout_s=5)

    async def calls() -> None:
        async with AsyncClient(target, api_key="k", timeout_s=60) as client:
            await client.complete(request, timeout_s=5)
            async with client.stream(request, timeout_s=5) as chunks:
                _ = [chunk async for chunk in chunks]
            await client.ask("hi", timeout_s=5)

    asyncio.run(calls())
    client_s, *own_s = fake.remaining
    assert 55 < client_s < 61  # gRPC rounds a deadline up a little
    assert len(own_s) == 6 and all(3 < s < 6 for s in own_s), own_s


def test_timeout_s_none_is_no_deadline_as_it_was(gateway: tuple[FakeGateway, str]) -> None:
    """``timeout_s=None`` was taken before a client checked its deadline (59fbb2d): gRPC's no
    deadline. It became a ValueError; it is no deadline again (a call's own ``timeout_s``
    still overrides it), blocking, asyncio and the Admin API's client."""
    fake, target = gateway
    request = build_request("hi")
    with Client(target, api_key="k", timeout_s=None) as client:
        client.complete(request)
        list(client.stream(request))
        client.complete(request, timeout_s=5)

    async def calls() -> None:
        async with AsyncClient(target, api_key="k", timeout_s=None) as client:
            await client.complete(request)

    asyncio.run(calls())
    AdminClient(target, admin_token="t", timeout_s=None).close()
    no_deadline, unbounded, own, aio = fake.remaining  # gRPC's "none": ~292 years
    assert min(no_deadline, unbounded, aio) > 1e9 and 3 < own < 6, fake.remaining


def test_any_real_number_is_a_deadline_not_a_bool(gateway: tuple[FakeGateway, str]) -> None:
    """A numpy float (float32 is no ``float``) or a Fraction: a real number of seconds; a
    bool is a mistake (True would be one second)."""
    import fractions

    import numpy

    fake, target = gateway
    for seconds in (numpy.float32(30), numpy.float64(30), numpy.int64(30), fractions.Fraction(30)):
        with Client(target, api_key="k", timeout_s=seconds) as client:  # type: ignore[arg-type]
            client.complete(build_request("hi"), timeout_s=seconds)  # type: ignore[arg-type]
    assert len(fake.remaining) == 4 and all(25 < s < 31 for s in fake.remaining)
    for wrong in (True, False, "30", numpy.float64(math.nan)):
        with pytest.raises(ValueError, match="timeout_s must be a number of seconds over 0"):
            Client(target, api_key="k", timeout_s=wrong)  # type: ignore[arg-type]
