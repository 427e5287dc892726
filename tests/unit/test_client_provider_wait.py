"""The Python client's channel and a provider's 429 whose ``retry-after`` outlasted the call
(every replica's provider asked for that wait: the router's UNAVAILABLE carries it as a
``retry-after`` trailer). Before, the router sent no server pushback with it, and the channel's
retry policy retried at once, as if nothing had been asked: 4 retries in ~3.75 s of a wait of
30 s (5 calls to the providers that asked for quiet). Now the router pushes back: the wait
itself, when the client's deadline leaves time for it (gRPC's retry waits it, as an SDK sleeps
an HTTP retry-after), else ``-1`` (no retry: the caller's ``UnavailableError`` carries the
wait). A fake Gateway (a real gRPC server in this process) answers with the router's own
trailers for the call's remaining deadline."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import Client, UnavailableError, build_request
from cachemesh.retry_info import (
    PUSHBACK_KEY,
    UPSTREAM_RATE_LIMITED,
    error_reason,
    retry_after_s,
    retry_delay_s,
)
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.errors import Code, RequestError
from services.http_front.errors import BILLED
from services.http_front.gateway import api_error
from services.router.access_log import Call
from services.router.call_trailers import channel_retried
from services.router.call_trailers import failed_call_trailers as router_trailers


class RateLimited(gateway_pb2_grpc.GatewayServicer):
    """Every call refused as the router refuses one whose providers asked for ``wait_s``."""

    def __init__(self, wait_s: int) -> None:
        self.wait_s = wait_s
        self.pushbacks: list[str] = []

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        refusal = RequestError(
            Code.UNAVAILABLE,
            f"no model replica could serve: retry in {self.wait_s} s, as the provider asked",
            retry_after_s=self.wait_s,
        )
        trailers = router_trailers(
            Call("Complete", 0.0),
            refusal,
            (),
            context.time_remaining(),
            channel_retried(context.invocation_metadata()),
        )
        self.pushbacks.append(next((str(v) for k, v in trailers if k == PUSHBACK_KEY), ""))
        context.set_trailing_metadata(trailers)
        context.abort(grpc.StatusCode.UNAVAILABLE, refusal.message)
        raise AssertionError("unreachable: abort raises")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        yield pb.CompleteChunk()


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[tuple[RateLimited, str]]:
    fake = RateLimited(request.param)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("gateway", [30], indirect=True)
def test_a_wait_past_the_clients_deadline_is_not_retried(
    gateway: tuple[RateLimited, str],
) -> None:
    fake, target = gateway
    question = build_request("Capital of France?", model="sim-small", max_tokens=8)
    with (
        Client(target, api_key="k", timeout_s=5.0) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.complete(question)
    print(f"\n{len(fake.pushbacks)} calls, pushbacks {fake.pushbacks}")
    assert len(fake.pushbacks) == 1, fake.pushbacks  # was 5: 4 retries of a 30 s wait
    assert fake.pushbacks == ["-1"]
    assert caught.value.retry_after_s == 30.0  # the caller is told the wait, and why
    assert caught.value.reason == UPSTREAM_RATE_LIMITED


def test_the_http_front_reads_it_as_a_wait_not_a_bill() -> None:
    """The HTTP front (no retry policy of its own) answers it as before the pushback: 529 /
    503 with the wait as retry-after, not the billed words a negative pushback alone means."""
    refusal = RequestError(Code.UNAVAILABLE, "no model replica could serve", retry_after_s=30)
    trailers = router_trailers(Call("Complete", 0.0), refusal, (), 5.0)
    error = api_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailers),
            refusal.message,
        )
    )
    assert error.status_for("anthropic") == 529 and BILLED not in error.message
    assert error.headers() == {"retry-after": "30"}  # the SDK waits it (60 s at most)


@pytest.mark.parametrize("gateway", [1], indirect=True)
def test_a_wait_within_the_clients_deadline_is_waited_for(
    gateway: tuple[RateLimited, str],
) -> None:
    """The channel retries it after the wait the providers asked for (gRPC's pushback), not
    at once, and once: the first refusal pushes back 1,000 ms while the deadline has room for
    it, the retry's is no retry (``test_router_pushback_once``)."""
    fake, target = gateway
    question = build_request("Capital of France?", model="sim-small", max_tokens=8)
    with (
        Client(target, api_key="k", timeout_s=30.0) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.complete(question)
    assert fake.pushbacks == ["1000", "-1"]  # waited for, retried once (was 1000 x 5)
    assert caught.value.retry_after_s == 1.0


@pytest.mark.parametrize(
    ("wait_s", "remaining_s", "pushback"),
    [
        (3600, None, "-1"),  # was 3600000: a no-deadline caller held ~4 h over 4 retries
        (61, 1000.0, "-1"),  # was 61000
        (60, None, "60000"),  # an SDK waits a retry-after up to 60 s: so does the channel
        (6, 30.0, "6000"),
    ],
)
def test_a_pushback_is_a_wait_of_a_minute_at_most(
    wait_s: int, remaining_s: float | None, pushback: str
) -> None:
    """A provider's wait is pushed back whole only up to ``MAX_PUSHBACK_S`` (60 s, as the
    SDKs cap a retry-after): a longer one, whatever the client's deadline (none, or one with
    room for it), is no retry, told with its wait (RetryInfo) and UPSTREAM_RATE_LIMITED.
    Before, any wait up to 366 days was pushed back, and the channel's policy slept it 4
    times."""
    refusal = RequestError(Code.UNAVAILABLE, "no model replica could serve", retry_after_s=wait_s)
    trailers = router_trailers(Call("Complete", 0.0), refusal, (), remaining_s)
    assert [str(v) for k, v in trailers if k == PUSHBACK_KEY] == [pushback]
    assert retry_after_s(trailers) == wait_s  # the HTTP front's retry-after, as before
    if pushback == "-1":
        assert retry_delay_s(trailers) == wait_s
        assert error_reason(trailers) == UPSTREAM_RATE_LIMITED
    else:
        assert error_reason(trailers) is None
