"""A provider's 429 wait that fits the client's deadline is pushed back to the client's channel
once, not on each of its retries.

Measured on a stack (a provider answering 429 with ``retry-after: 6`` to every call, the Python
client with a 30 s deadline): the router pushed back 6,000 ms on every attempt, and the
channel's retry policy slept it before each of its 4 retries: the caller was held ~24 s for 5
provider calls. Now an attempt that is already a retry of the channel's policy (gRPC sets
``grpc-previous-rpc-attempts`` on it) is ended with no retry (``-1``), a RetryInfo of the wait
and ``UPSTREAM_RATE_LIMITED``: 2 provider calls, one wait. A real grpc.aio server and channel,
with the client's own retry policy; the calls are counted, not timed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from cachemesh._channel import channel_options
from cachemesh.retry_info import PUSHBACK_KEY, UPSTREAM_RATE_LIMITED, error_reason, retry_delay_s
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.errors import Code, RequestError
from services.router.call_trailers import channel_retried
from tests.unit.gateway_support import gateway_servicer

KEY = "sk-pushback-once-0123456789abcdef"
WAIT_S = 1  # the provider's retry-after (the channel sleeps it: kept short)


class RateLimited:
    """A pipeline whose every replica's provider asked for ``WAIT_S`` (a 429's retry-after):
    each run is one round of provider calls, counted."""

    def __init__(self) -> None:
        self.calls = 0

    async def run(
        self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
    ) -> AsyncIterator[pb.CompleteChunk]:
        self.calls += 1
        raise RequestError(
            Code.UNAVAILABLE,
            f"no model replica could serve: retry in {WAIT_S} s, as the provider asked",
            retry_after_s=WAIT_S,
        )
        yield pb.CompleteChunk()  # an async generator, as the pipeline's run is


def _request() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        max_tokens=10,
        request_id="req-pushback-once",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello?")])],
    )


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
async def test_a_providers_wait_is_pushed_back_once(method: str) -> None:
    pipeline = RateLimited()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(
        gateway_servicer(pipeline, {KEY: "tenant-a"}), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        options = channel_options(wait_for_ready=True)  # the client's policy: 5 attempts
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            metadata = (("authorization", f"Bearer {KEY}"),)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if method == "Complete":
                    await stub.Complete(_request(), timeout=30.0, metadata=metadata)
                else:
                    async for _ in stub.StreamComplete(_request(), timeout=30.0, metadata=metadata):
                        pass
    finally:
        await server.stop(None)
    error = caught.value
    print(f"\n{method}: {pipeline.calls} provider calls")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert pipeline.calls == 2, pipeline.calls  # was 5: the wait slept before each retry
    trailers = tuple(error.trailing_metadata() or ())
    assert [v for k, v in trailers if k == PUSHBACK_KEY] == ["-1"]
    assert retry_delay_s(trailers) == WAIT_S  # the caller is told the wait, and why
    assert error_reason(trailers) == UPSTREAM_RATE_LIMITED


@pytest.mark.parametrize(
    ("metadata", "retried"),
    [
        ((("grpc-previous-rpc-attempts", "1"),), True),
        ((("grpc-previous-rpc-attempts", "3"),), True),
        ((("grpc-previous-rpc-attempts", "0"),), False),
        ((("grpc-previous-rpc-attempts", "x"),), False),
        ((("cachemesh-retry", "1"),), False),  # the caller's own retry: its channel's first
        ((), False),
        (None, False),
    ],
)
def test_a_channels_retry_is_told_by_its_previous_attempts(
    metadata: tuple[tuple[str, str], ...] | None, retried: bool
) -> None:
    assert channel_retried(metadata) is retried
