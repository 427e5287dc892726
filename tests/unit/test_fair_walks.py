"""The walks of large requests share one thread by tenant, in turn (``FairWalks``): one
tenant's flood of large requests held another tenant's 70 kB request 2.95 s behind it on the
router's first-come queue. Gated fake walks, no clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.errors import Code, RequestError
from services.common.fair_walks import FairWalks
from services.router import servicer as servicer_module
from services.router.servicer import GatewayServicer
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_large_request_off_loop import _many_messages
from tests.unit.test_router_answer_ledger import KEY
from tests.unit.test_router_unanswered_money import BilledPipeline

KEY_B = "sk-cm-tenant-b-" + "b" * 32


class Gate:
    """Walks that record their order; the first blocks until ``open``."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self._open = threading.Event()
        self._first = True

    def walk(self, name: str) -> str:
        if self._first:
            self._first = False
            assert self._open.wait(30), "the test never opened the gate"
        self.order.append(name)
        return name

    def open(self) -> None:
        self._open.set()


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("never came")


async def test_tenants_walks_are_taken_in_turn_not_first_come() -> None:
    walks, gate = FairWalks("test-walks"), Gate()
    flood = [asyncio.ensure_future(walks.run("x", gate.walk, f"x{i}")) for i in range(4)]
    await _until(lambda: walks.count("x") == 4)
    other = asyncio.ensure_future(walks.run("y", gate.walk, "y0"))
    await _until(lambda: walks.count("y") == 1)
    gate.open()
    assert await other == "y0"
    await asyncio.gather(*flood)
    assert gate.order == ["x0", "y0", "x1", "x2", "x3"]  # first-come: y0 last
    assert walks.count("x") == walks.count("y") == 0


async def test_a_cancelled_walk_never_runs_and_a_tenant_is_never_refused_for_waiting() -> None:
    walks, gate = FairWalks("test-walks"), Gate()
    waiting = [asyncio.ensure_future(walks.run("x", gate.walk, f"x{i}")) for i in range(20)]
    await _until(lambda: walks.count("x") == 20)
    other = asyncio.ensure_future(walks.run("y", gate.walk, "y0"))
    await _until(lambda: walks.count("y") == 1)
    waiting[1].cancel()
    await _until(lambda: walks.count("x") == 19)
    gate.open()
    assert await other == "y0"
    done = await asyncio.gather(*waiting[:1], *waiting[2:])
    assert done == ["x0", *(f"x{i}" for i in range(2, 20))]
    assert "x1" not in gate.order and gate.order[:2] == ["x0", "y0"]
    assert walks.count("x") == walks.count("y") == 0


@pytest.fixture
async def router() -> AsyncIterator[tuple[GatewayServicer, gateway_pb2_grpc.GatewayAsyncStub]]:
    servicer = gateway_servicer(
        BilledPipeline(), {KEY: "tenant-a", KEY_B: "tenant-b"}, max_request_bytes=4 << 20
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
    )
    try:
        yield servicer, gateway_pb2_grpc.GatewayStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_the_router_reads_another_tenants_large_request_before_a_floods_rest(
    router: tuple[GatewayServicer, gateway_pb2_grpc.GatewayAsyncStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servicer, stub = router
    gate = Gate()

    def validate(request: pb.CompleteRequest, *_: object) -> None:
        gate.walk(request.request_id)
        raise RequestError(Code.INVALID_ARGUMENT, "seen")  # the test's end of the call

    monkeypatch.setattr(servicer_module, "validate_request", validate)

    def send(key: str, request_id: str) -> asyncio.Future[object]:
        request = _many_messages(30_000)
        request.request_id = request_id
        call = stub.Complete(request, metadata=(("authorization", f"Bearer {key}"),))
        return asyncio.ensure_future(call)

    flood = [send(KEY, f"a{i}") for i in range(12)]
    walks = servicer._walks
    assert isinstance(walks, FairWalks)
    await _until(lambda: walks.count("tenant-a") == 12)  # none refused for waiting
    other = send(KEY_B, "b0")
    await _until(lambda: walks.count("tenant-b") == 1)
    gate.open()
    for call in (other, *flood):
        with pytest.raises(grpc.aio.AioRpcError) as seen:
            await call
        assert seen.value.details() == "seen"
    assert gate.order[0].startswith("a") and gate.order[1] == "b0"  # first-come: b0 last
