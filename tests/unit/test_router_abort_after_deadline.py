"""A refusal or a cut the caller can no longer receive (its deadline passed while the router
worked, before gRPC told the handler) is no error of the server.

A soak of 300 calls with a 30 ms deadline logged 17 pairs of ERRORs (~7 KB each, no trace id):
``context.abort`` on a call the transport had already finished raised gRPC's
``ExecuteBatchError``; the last resort (``services.common.wire``) logged it as "unexpected" and
aborted again, and gRPC logged its "Abort already called!". Now the status is not sent to a
call that is over: the access log and span still say it, a DEBUG line says why it was not sent.

A real grpc.aio server, as a fake context cannot finish a call under its handler: the pipeline
holds the event loop until the call's deadline has passed, as a busy router does, so gRPC has
not yet cancelled the handler when it aborts (a 50 ms deadline, the only wait, longer only
when the machine was too loaded to read the request in time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.wire import MalformedRequests
from services.router.model_answer import DeadlineCut
from tests.unit.gateway_support import gateway_servicer

KEY = "sk-abort-after-deadline-0123456789"
DEADLINE_S = 0.05
# a try whose request gRPC could not read within its deadline is made again, the deadline 4x
# as long, up to this (the handler holds the loop that long: 3.2 s)
_LONGEST_DEADLINE_S = 3.2
# how long a server's stop waits for its calls to end (a bound on a hang only)
_GRACE_S = 30.0


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


def _request() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        max_tokens=10,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello?")])],
    )


def _errors(records: Sequence[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]


async def _call(method: str, deadline_s: float) -> LateCut:
    """One call with ``deadline_s``, on a server of its own, stopped before this returns:
    gracefully, so once every call is over, its handler ended and its access line written
    (``_GRACE_S`` only bounds a hang)."""
    cut = LateCut()
    server = grpc.aio.server(interceptors=[MalformedRequests()])
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway_servicer(cut, {KEY: "tenant-a"}), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            metadata = (("authorization", f"Bearer {KEY}"),)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if method == "Complete":
                    await stub.Complete(_request(), timeout=deadline_s, metadata=metadata)
                else:
                    replies = stub.StreamComplete(_request(), timeout=deadline_s, metadata=metadata)
                    async for _ in replies:
                        pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(_GRACE_S)
    return cut


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
async def test_a_cut_the_caller_can_no_longer_receive_logs_no_error(
    caplog: pytest.LogCaptureFixture, method: str
) -> None:
    """On a loaded machine the caller's deadline may pass before the server reads the request:
    gRPC then ends the call without ever calling the servicer (nothing of the router runs: no
    access line, no error; grpc's DEBUG "Failed to receive any message from Core"). The test
    polled 5 s for an access line that could not come, and failed (load 5.7). Such a try tests
    nothing: the call is made again with a deadline 4x as long, until the handler is reached."""
    caplog.set_level(logging.DEBUG)
    deadline_s = DEADLINE_S
    while True:
        caplog.clear()
        cut = await _call(method, deadline_s)
        assert _errors(caplog.records) == []
        if cut.ran or deadline_s >= _LONGEST_DEADLINE_S:
            break
        deadline_s *= 4
    assert cut.ran, f"gRPC never handed the call to the servicer, even with {deadline_s} s"
    access = [r for r in caplog.records if r.name == "cachemesh.access"]
    assert len(access) == 1
    fields = access[0].__dict__["fields"]  # the status the caller's client saw
    assert (fields["status"], fields["deadline"]) == ("DEADLINE_EXCEEDED", "client")
    # the handler aborted a call that was over: the status kept, not sent
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("not sent" in line for line in debug)
