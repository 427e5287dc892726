"""A refusal of a request sent without a request_id names, in its ``cachemesh-request-id``
trailer, the id the router made up for it: the id its access line and trace name. The HTTP
front named an id of its own instead (a review, live stack: a 429's request-id
2eef76da7dbd4ff496336ff5ae4334d5 was in no log; the router's access line of that refusal said
a772c70eae2d4aeb936d0670dc5a4da4). A request with its own id gets no such trailer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cachemesh import build_request
from cachemesh.retry_info import REQUEST_ID_KEY, made_request_id
from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import Code, RequestError
from services.router.limit_policy import LimitPolicy
from services.router.servicer import GatewayServicer
from tests.unit.gateway_support import gateway_servicer, memory_limiter
from tests.unit.test_router_answer_ledger import (
    KEY,
    Aborted,
    FakeContext,
    FakePipeline,
)


class TrailersContext(FakeContext):
    """Keeps the trailers a refusal is sent with."""

    def __init__(self) -> None:
        super().__init__()
        self.trailers: tuple[tuple[str, Any], ...] = ()

    async def abort(self, code: Any, message: str, **kwargs: Any) -> None:
        self.trailers = tuple(kwargs.get("trailing_metadata") or ())
        await super().abort(code, message)


class Failing(FakePipeline):
    async def run(self, *args: Any, **kwargs: Any) -> AsyncIterator[pb.CompleteChunk]:
        raise RequestError(Code.UNAVAILABLE, "every replica of sim-small is down")
        yield pb.CompleteChunk()  # pragma: no cover  (an async generator)


def _router(pipeline: FakePipeline, requests_per_min: int | None = None) -> GatewayServicer:
    limiter = memory_limiter(LimitPolicy(requests_per_min=requests_per_min))
    return gateway_servicer(pipeline, {KEY: "tenant-a"}, limiter=limiter)


def _logged_ids(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The request_id of each access line (the text format's fields)."""
    return [
        r.fields["request_id"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "cachemesh.access"
    ]


async def _refused(servicer: GatewayServicer, request: pb.CompleteRequest) -> TrailersContext:
    context = TrailersContext()
    with pytest.raises(Aborted):
        await servicer.Complete(request, context)  # type: ignore[arg-type]
    return context


@pytest.mark.parametrize("own_id", ["", "order-7"])
async def test_a_rate_limit_refusal_names_the_id_the_router_made_up(
    own_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    servicer = _router(FakePipeline(), requests_per_min=1)
    first = build_request("one", model="sim-small")
    await servicer.Complete(first, FakeContext())  # type: ignore[arg-type]
    second = build_request("two", model="sim-small", request_id=own_id)
    with caplog.at_level(logging.INFO, logger="cachemesh.access"):
        context = await _refused(servicer, second)
        await asyncio.sleep(0)  # the access line is written once the call's bills are in
    made = made_request_id(context.trailers)
    if own_id:
        assert made == "" and REQUEST_ID_KEY not in dict(context.trailers)
    else:
        assert made and made == second.request_id != first.request_id
        assert _logged_ids(caplog) == [made]  # its access line's request_id


async def test_a_failure_after_admission_names_the_id_the_router_made_up() -> None:
    request = build_request("one", model="sim-small")
    context = await _refused(_router(Failing()), request)
    assert made_request_id(context.trailers) == request.request_id != ""
