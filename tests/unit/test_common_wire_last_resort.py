"""An exception no servicer mapped reaches the caller as INTERNAL with its type only: grpc's
own answer is UNKNOWN with the exception's text (a file path, a host)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.wire import MalformedRequests

SECRET_PATH = "/srv/secret-volume/api-keys"


async def _unary(request: bytes, context: Any) -> bytes:
    raise PermissionError(13, "Permission denied", SECRET_PATH)


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    raise PermissionError(13, "Permission denied", SECRET_PATH)


async def _refusing(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    return b""


def _held_past_the_deadline(context: Any) -> None:
    """Holds the event loop until the call's deadline has passed (and gRPC's own threads have
    had 1 s to finish the call: 50 ms were too few once, with two test workers on two cores,
    and 250 ms once with the process paused now and then): gRPC has finished the call but not
    yet cancelled its handler (a busy loop), as a short client deadline meets."""
    until = time.monotonic() + context.time_remaining() + 1.0
    while time.monotonic() < until:
        pass


async def _refusing_late(request: bytes, context: Any) -> bytes:
    _held_past_the_deadline(context)
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    return b""


async def _failing_late(request: bytes, context: Any) -> bytes:
    _held_past_the_deadline(context)
    raise PermissionError(13, "Permission denied", SECRET_PATH)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[MalformedRequests()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=bytes, response_serializer=bytes
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=bytes, response_serializer=bytes
        ),
        "Refusing": grpc.unary_unary_rpc_method_handler(
            _refusing, request_deserializer=bytes, response_serializer=bytes
        ),
        "RefusingLate": grpc.unary_unary_rpc_method_handler(
            _refusing_late, request_deserializer=bytes, response_serializer=bytes
        ),
        "FailingLate": grpc.unary_unary_rpc_method_handler(
            _failing_late, request_deserializer=bytes, response_serializer=bytes
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(None)


def _call(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(
        f"/t.S/{method}", request_serializer=bytes, response_deserializer=bytes
    )


async def test_an_unmapped_exception_is_internal_without_its_text(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "cachemesh.wire")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Unary")(b"x")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "PermissionError" in details and SECRET_PATH not in details
    assert any(record.exc_info for record in caplog.records)  # the service's log has it all


async def test_a_stream_that_fails_midway_is_internal_after_what_it_sent(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.unary_stream(
        "/t.S/Stream", request_serializer=bytes, response_deserializer=bytes
    )
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in call(b"x"):
            got.append(item)
    assert got == [b"first"]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET_PATH not in (caught.value.details() or "")


async def test_a_servicers_own_status_passes_unchanged(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Refusing")(b"x")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "not yours"


async def _late(channel: grpc.aio.Channel, method: str, caplog: pytest.LogCaptureFixture) -> None:
    """Calls ``method`` with a 50 ms deadline (the only wait) and lets its handler end."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, method)(b"x", timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(500):  # the server's handler may end after the client's call did
        if any("cancelled" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)


async def test_an_abort_of_a_call_over_is_no_error(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """The abort of a call whose deadline passed under its handler raised gRPC's
    ExecuteBatchError: the last resort logged it at ERROR and aborted again, and gRPC logged
    "Abort already called!" at ERROR. Now a DEBUG line."""
    caplog.set_level(logging.DEBUG)
    await _late(channel, "RefusingLate", caplog)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("not sent to a call already over" in r.getMessage() for r in caplog.records)


async def test_a_bug_after_the_deadline_is_still_an_error_but_aborts_nothing(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _late(channel, "FailingLate", caplog)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.getMessage()) for r in errors] == [
        ("cachemesh.wire", "unexpected PermissionError in a request's handling")
    ]
