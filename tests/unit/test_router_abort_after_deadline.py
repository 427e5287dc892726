"""A refusal or a cut the caller can no longer receive (its deadline passed while the router
worked, before gRPC told the handler) is no error of the server.

A soak of 300 calls with a 30 ms deadline logged 17 pairs of ERRORs (~7 KB each, no trace id):
``context.abort`` on a call the transport had already finished raised gRPC's
``ExecuteBatchError``; the last resort (``services.common.wire``) logged it as "unexpected" and
aborted again, and gRPC logged its "Abort already called!". Now the status is not sent to a
call that is over: the access log and span still say it, a DEBUG line says why it was not sent.

A real grpc.aio server, as a fake context cannot finish a call under its handler: the pipeline
holds the event loop until the call's deadline has passed, as a busy router does, so gRPC has
not yet cancelled the handler when it aborts (a 50 ms deadline, the only wait).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.auth import ApiKeys, hash_key
from services.common.clock import SystemClock
from services.common.metrics import TenantLabels, new_registry
from services.common.wire import MalformedRequests
from services.router.access_log import RequestLog
from services.router.idempotency import IdempotencyTable
from services.router.limits import Limiter, LimitPolicy, MemoryLimitStore, UniformPolicies
from services.router.metrics import RouterMetrics
from services.router.model_answer import DeadlineCut
from services.router.servicer import GatewayServicer
from tests.unit.test_router_answer_ledger import TABLE

KEY = "sk-abort-after-deadline-0123456789"
DEADLINE_S = 0.05


class LateCut:
    """A pipeline whose model call is cut by the request's own deadline, noticed only once it
    has passed, the event loop held meanwhile (gRPC cannot cancel the handler first).
    ``ran``: it was reached (on a loaded machine gRPC may cancel the handler before it is)."""

    def __init__(self) -> None:
        self.ran = False

    async def run(
        self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
    ) -> AsyncIterator[pb.CompleteChunk]:
        self.ran = True
        remaining_s = kwargs.get("time_remaining_s")
        assert remaining_s is not None
        until = time.monotonic() + remaining_s + 0.05  # gRPC's threads finish the call
        while time.monotonic() < until:  # held, as a loop busy with other requests is
            pass
        raise DeadlineCut(False, "the answer was still running at the request's deadline")
        yield pb.CompleteChunk()  # an async generator, as the pipeline's run is


def _no_prompt(request: pb.CompleteRequest) -> int:
    raise AssertionError("no token rate in these tests")


def _servicer(cut: LateCut) -> GatewayServicer:
    return GatewayServicer(
        ApiKeys({hash_key(KEY): "tenant-a"}),
        TABLE,
        {"sim-small", "sim-large"},
        cut,  # type: ignore[arg-type]
        IdempotencyTable(SystemClock(), 60, 100),
        Limiter(MemoryLimitStore(), UniformPolicies(LimitPolicy()), SystemClock(), _no_prompt),
        RequestLog(RouterMetrics(new_registry(), TenantLabels(1)), TABLE, time.perf_counter),
    )


@pytest.fixture
def cut() -> LateCut:
    return LateCut()


@pytest.fixture
async def channel(cut: LateCut) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[MalformedRequests()])
    gateway_pb2_grpc.add_GatewayServicer_to_server(_servicer(cut), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(None)


def _request() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        max_tokens=10,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello?")])],
    )


def _errors(records: Sequence[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
async def test_a_cut_the_caller_can_no_longer_receive_logs_no_error(
    channel: grpc.aio.Channel, cut: LateCut, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    metadata = (("authorization", f"Bearer {KEY}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Complete":
            await stub.Complete(_request(), timeout=DEADLINE_S, metadata=metadata)
        else:
            async for _ in stub.StreamComplete(_request(), timeout=DEADLINE_S, metadata=metadata):
                pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(500):  # the server's handler may end after the client's call did
        if any(r.name == "cachemesh.access" for r in caplog.records):
            break
        await asyncio.sleep(0.01)  # (gRPC's threads too: 100 turns of the loop were too few)
    assert _errors(caplog.records) == []
    access = [r for r in caplog.records if r.name == "cachemesh.access"]
    assert len(access) == 1
    fields = access[0].__dict__["fields"]  # the status the caller's client saw
    assert (fields["status"], fields["deadline"]) == ("DEADLINE_EXCEEDED", "client")
    if cut.ran:  # the handler aborted a call that was over: the status kept, not sent
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert any("not sent" in line for line in debug)
