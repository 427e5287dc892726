"""A request reaching a router as it stops: gRPC cuts it with CANCELLED before any handler ran
(the router's drain takes no new call), so nothing was made or billed and a retry is safe.

Measured (SIGTERM to a router under load through the HTTP front, three runs): in one, the
request sent at the instant of the signal was answered 500 ``api_error`` "the Gateway failed
(CANCELLED): CANCELLED", where those a moment later were 529 "the Gateway is unreachable;
retry"; the router logged no access line for it. A deploy's restart showed as a server error.
Now the front answers it as it answers a Gateway that is not there: overloaded (Anthropic
529, OpenAI 503), saying the Gateway stopped before answering."""

from __future__ import annotations

import grpc

from services.common.errors import Code
from services.http_front.errors import GATEWAY_STOPPED, from_gateway
from services.http_front.gateway import BROKE_OFF, Gateway


def test_a_gateway_cancel_is_overloaded_and_retryable() -> None:
    error = from_gateway(Code.CANCELLED, "CANCELLED")
    assert error.status_for("anthropic") == 529
    assert error.status_for("openai") == 503
    assert "stopped before answering" in error.message and "retry" in error.message
    assert "failed" not in error.message
    assert error.headers().get("x-should-retry") is None  # the SDKs retry it


def test_a_billed_gateway_cancel_stays_final() -> None:
    """The Gateway's no-retry mark (a model call of it billed) still wins: no SDK retry."""
    error = from_gateway(Code.CANCELLED, "CANCELLED", billed=True)
    assert error.headers().get("x-should-retry") == "false"


async def test_a_gateway_cancel_mid_answer_says_the_answer_broke_off() -> None:
    """Once the stream had begun, the answer is not whole: not "before answering"."""
    gateway = Gateway("127.0.0.1:1", timeout_s=5.0)
    cut = grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "CANCELLED"
    )
    try:
        assert gateway._failure(cut, began=False).message == GATEWAY_STOPPED
        mid = gateway._failure(cut, began=True)
        assert mid.message == BROKE_OFF and mid.status_for("anthropic") == 529
    finally:
        await gateway.close()
