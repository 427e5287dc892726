"""The Python client against a fake Gateway (a real gRPC server in this process): its errors
carry the request id to retry with, cross a process boundary, and a stream that stops before
its end is an error, never an answer taken for whole."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    RateLimitError,
    UnavailableError,
    build_request,
)
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.slow_first = threading.Event()  # set: the first Complete outlasts the deadline
        self.end_stream = True

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.ids.append(request.request_id)
        if self.slow_first.is_set() and len(self.ids) == 1:
            time.sleep(1.0)  # answered (and billed) after the client gave up
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        self.ids.append(request.request_id)
        yield pb.CompleteChunk(start=pb.CompleteResponse(model="sim-small"))
        yield pb.CompleteChunk(delta=pb.ContentBlock(text="the first half"))
        if self.end_stream:
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


def test_an_error_names_the_request_id_to_retry_with(gateway: tuple[FakeGateway, str]) -> None:
    """The client gave up (its deadline) while the Gateway answered: a retry with the id the
    error names is the same request to the Gateway (answered and billed once)."""
    fake, target = gateway
    fake.slow_first.set()
    request = build_request("What is a KV cache?")
    with Client(target, api_key="k", timeout_s=0.3) as client:
        with pytest.raises(UnavailableError) as caught:
            client.complete(request)
        assert caught.value.request_id and caught.value.request_id == fake.ids[0]
        request.request_id = caught.value.request_id
        client.complete(request)
    assert fake.ids == [fake.ids[0]] * 2


def test_a_stream_that_stops_before_its_end_is_an_error(
    gateway: tuple[FakeGateway, str],
) -> None:
    fake, target = gateway
    fake.end_stream = False
    with Client(target, api_key="k") as client:
        chunks: list[pb.CompleteChunk] = []
        with pytest.raises(UnavailableError, match="without its end chunk") as caught:
            chunks.extend(client.stream(build_request("hi")))
        assert [c.WhichOneof("part") for c in chunks] == ["start", "delta"]
        assert caught.value.request_id == fake.ids[-1]

    async def streamed() -> None:
        async with AsyncClient(target, api_key="k") as client:
            with pytest.raises(UnavailableError, match="without its end chunk"):
                async for _ in client.stream(build_request("hi")):
                    pass

    asyncio.run(streamed())
    fake.end_stream = True
    with Client(target, api_key="k") as client:
        assert [c.WhichOneof("part") for c in client.stream(build_request("hi"))][-1] == "end"


def test_errors_cross_a_process_boundary_whole() -> None:
    """A process pool hands a worker's exception back pickled: the typed error, its id and
    its retry-after survive (they broke the pool before)."""
    error = RateLimitError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "req-1")
    error.retry_after_s = 3.0
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is RateLimitError and str(back) == str(error)
    assert (back.code, back.message, back.request_id, back.retry_after_s) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "slow down",
        "req-1",
        3.0,
    )


def test_the_demo_without_a_gateway_fails_at_once_saying_where(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It waited out its 120 s timeout for a Gateway that was not running, then said only
    DEADLINE_EXCEEDED."""
    from cachemesh.demo.__main__ import main

    monkeypatch.setenv("CACHEMESH_TARGET", "127.0.0.1:1")
    monkeypatch.setenv("CACHEMESH_KEY_A", "a")
    monkeypatch.setenv("CACHEMESH_KEY_B", "b")
    assert main() == 1
    err = capsys.readouterr().err
    assert "could not connect to the Gateway at 127.0.0.1:1" in err and "make up" in err


def test_an_unavailable_error_names_the_request_id_to_retry_with() -> None:
    """Its answer may have been made (and billed): a traceback or a log of ``str(error)``
    keeps the id a retry needs to be answered once."""
    cut = UnavailableError(grpc.StatusCode.UNAVAILABLE, "connection reset", "abc123")
    assert str(cut) == "UNAVAILABLE: connection reset (request_id abc123)"
    assert str(UnavailableError(grpc.StatusCode.UNAVAILABLE, "down")) == "UNAVAILABLE: down"
    assert str(pickle.loads(pickle.dumps(cut))) == str(cut)


def _status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An RpcError as gRPC raises it: a call's code and details, no trailers."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


# the router's words for a call it cut at the caller's deadline (services.router.model_answer)
ROUTER_CUT = (
    "the sim-small answer was still running at its deadline, the request's deadline (2.0 s), "
    "and was cut; billed for what was produced, not cached"
)


def test_a_deadline_cut_is_its_own_error_advising_a_longer_deadline_not_a_retry() -> None:
    """A call cut at its deadline made no answer (billed for what it produced): a retry with
    its id is a new model call, billed again, cut the same way. It was an UnavailableError
    whose text named the id "to retry with"; it stays one (``except UnavailableError`` still
    catches it)."""
    from cachemesh._errors import from_rpc_error

    error = from_rpc_error(_status(grpc.StatusCode.DEADLINE_EXCEEDED, ROUTER_CUT), "r1")
    assert type(error) is DeadlineExceededError and isinstance(error, UnavailableError)
    assert error.cut_by_gateway
    text = str(error)
    assert text.startswith(f"DEADLINE_EXCEEDED: {ROUTER_CUT} (request_id r1: ")
    assert "longer deadline" in text and "smaller max_tokens" in text and "billed" in text
    assert str(pickle.loads(pickle.dumps(error))) == text
    unavailable = from_rpc_error(_status(grpc.StatusCode.UNAVAILABLE, "down"), "r2")
    assert type(unavailable) is UnavailableError


def _refused_with(trailers: tuple[tuple[str, str | bytes], ...]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailers),
        "the prompt has 9000 tokens, over sim-small's context window of 8192",
    )


@pytest.mark.parametrize("reason", ["CONTEXT_WINDOW", "REQUEST_TOO_LARGE"])
def test_a_request_too_large_is_not_a_rate_limit(reason: str) -> None:
    """A prompt over the context window or the Gateway's size limit was a RateLimitError with
    no retry_after and nothing telling it from a rate limit: `except RateLimitError: sleep;
    retry` looped forever. The Gateway's ErrorInfo reason makes it a RequestTooLargeError."""
    from cachemesh import CachemeshError, MessageTooLargeError, RequestTooLargeError
    from cachemesh._errors import from_rpc_error
    from services.common.errors import Code
    from services.common.retry_info import refusal_trailers

    trailers = refusal_trailers(Code.RESOURCE_EXHAUSTED, "too large", reason)
    error = from_rpc_error(_refused_with(trailers), "r1")
    assert type(error) is RequestTooLargeError and not isinstance(error, RateLimitError)
    assert isinstance(error, CachemeshError) and error.reason == reason
    assert error.request_id == "r1" and "context window" in str(error)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is RequestTooLargeError and back.reason == reason
    # gRPC's own "message larger than max": the same family (ask for less), one tree
    assert issubclass(MessageTooLargeError, RequestTooLargeError)


@pytest.mark.parametrize(
    ("limit", "reason"), [("requests", "RATE_LIMITED"), ("day_budget", "BUDGET_EXHAUSTED")]
)
def test_a_rate_or_budget_refusal_is_a_rate_limit_with_its_reason(limit: str, reason: str) -> None:
    from cachemesh._errors import from_rpc_error
    from services.common.errors import Code
    from services.common.retry_info import retry_trailers

    trailers = retry_trailers(Code.RESOURCE_EXHAUSTED, "wait", 2_500, "tenant:t", (limit,), reason)
    error = from_rpc_error(_refused_with(trailers), "r2")
    assert type(error) is RateLimitError
    assert (error.retry_after_s, error.reason) == (2.5, reason)
    # a Gateway that sends no ErrorInfo (older): a RateLimitError as before
    plain = retry_trailers(Code.RESOURCE_EXHAUSTED, "wait", 1_000, "tenant:t", (limit,))
    older = from_rpc_error(_refused_with(plain), "r3")
    assert type(older) is RateLimitError and older.reason is None


def test_a_deadline_with_no_status_from_the_gateway_says_both_what_it_may_be() -> None:
    """A Gateway that answered once, then went away: the next call waits for it (wait_for_ready)
    until its deadline, gRPC's own "Deadline Exceeded". This side cannot tell that from a cut
    the router made and billed whose status came after the deadline (5 of 64 calls at 0.2 s on
    a live stack, each told "it may never have received the call", the retry billed 333,000
    nanos more): the error says both, and what a retry with its id is (replayed if an answer
    was made, else a new model call, billed again). A cut the Gateway says in its own words
    keeps its advice (above)."""
    fake = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with Client(f"127.0.0.1:{port}", api_key="k", timeout_s=1.0) as client:
        client.complete(build_request("hi"))  # answered: from now on a call waits for it
        server.stop(None).wait()
        with pytest.raises(DeadlineExceededError) as caught:
            client.complete(build_request("hi again"))
    error = caught.value
    assert error.message == "Deadline Exceeded" and not error.cut_by_gateway
    text = str(error)
    assert f"request_id {error.request_id}: no status from the Gateway" in text
    assert "may have cut it and billed what the model produced" in text
    assert "its status arriving too late, or never received it" in text
    assert "replayed if an answer was made, else is a new model call, billed again" in text
    assert "retry with it" in text
    assert len(fake.ids) == 1  # the second call never reached it


class StallingGateway(FakeGateway):
    """Streams one chunk, then says nothing until ``stall`` is set (past the client's
    deadline): the deadline passes on the client's side mid-stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stall = threading.Event()

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        yield pb.CompleteChunk(start=pb.CompleteResponse(model="sim-small"))
        self.stall.wait(5.0)


def test_a_local_deadline_mid_stream_is_not_taken_for_the_gateways_cut() -> None:
    """gRPC's own deadline after a chunk is "Stream removed (Deadline Exceeded)", not "Deadline
    Exceeded": it was classed ``cut_by_gateway`` True, "billed ...: a retry is a new model call"
    with no word from the Gateway at all. It is a local deadline, blocking and asyncio."""
    fake = StallingGateway()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    errors: list[DeadlineExceededError] = []
    try:
        with Client(target, api_key="k") as client:
            got = 0
            with pytest.raises(DeadlineExceededError) as caught:
                for _ in client.stream(build_request("hi"), timeout_s=1.5):
                    got += 1
            assert got == 1
            errors.append(caught.value)

        async def read() -> None:
            async with AsyncClient(target, api_key="k") as client:
                with pytest.raises(DeadlineExceededError) as caught:
                    async for _ in client.stream(build_request("hi"), timeout_s=1.5):
                        pass
                errors.append(caught.value)

        asyncio.run(read())
    finally:
        fake.stall.set()
        server.stop(None)
    for error in errors:
        # gRPC says either, by when its deadline meets the stream's state (a clean clone's run
        # read "Deadline Exceeded" after the chunk once): both are this side's, neither the
        # Gateway's; on the old rule "Stream removed (...)" was classed the Gateway's cut
        assert error.message in ("Stream removed (Deadline Exceeded)", "Deadline Exceeded")
        assert not error.cut_by_gateway
        assert "no status from the Gateway" in str(error)


def test_an_invalid_request_carries_the_gateways_reason() -> None:
    """The Gateway's refusal of a value the target model's provider refuses (a temperature but
    1 to gpt-5) is INVALID_ARGUMENT with ErrorInfo ``UNSUPPORTED_VALUE``. Before, an
    ``InvalidRequestError`` had no ``reason``: a caller told it from any malformed field only
    by the message's words. A refusal without ErrorInfo has ``reason`` None."""
    from cachemesh import InvalidRequestError, NotFoundError
    from cachemesh._errors import from_rpc_error
    from cachemesh.retry_info import UNSUPPORTED_VALUE
    from services.common.errors import Code
    from services.common.retry_info import refusal_trailers

    message = "temperature: gpt-5 takes only its default, 1; omit temperature or send 1, got 0.5"
    trailers = refusal_trailers(Code.INVALID_ARGUMENT, message, UNSUPPORTED_VALUE)

    def refused(code: grpc.StatusCode, *trailer: tuple[str, str | bytes]) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailer), message)

    error = from_rpc_error(refused(grpc.StatusCode.INVALID_ARGUMENT, *trailers), "r1")
    assert type(error) is InvalidRequestError and error.reason == UNSUPPORTED_VALUE
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is InvalidRequestError and back.reason == UNSUPPORTED_VALUE
    plain = from_rpc_error(refused(grpc.StatusCode.INVALID_ARGUMENT), "r2")
    assert type(plain) is InvalidRequestError and plain.reason is None
    missing = from_rpc_error(refused(grpc.StatusCode.NOT_FOUND), "r3")
    assert type(missing) is NotFoundError and missing.reason is None
