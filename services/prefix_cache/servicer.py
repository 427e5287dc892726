"""gRPC ``cachemesh.v1.PrefixCache``: the API's messages over the wire, its errors as codes."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc

from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.common.errors import RequestError
from services.common.status import grpc_code
from services.prefix_cache.api import PrefixCacheApi

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


class PrefixCacheServicer(prefix_cache_pb2_grpc.PrefixCacheServicer):
    def __init__(self, api: PrefixCacheApi) -> None:
        self._api = api

    async def Plan(self, request: pc.PlanRequest, context: Context) -> pc.PlanResponse:
        return await _answer(context, self._api.plan(request))

    async def Commit(self, request: pc.CommitRequest, context: Context) -> pc.CommitResponse:
        return await _answer(context, self._api.commit(request))

    async def Totals(self, request: pc.TotalsRequest, context: Context) -> pc.TotalsResponse:
        return await _answer(context, self._api.totals(request))


async def _answer(context: Context, call: Awaitable[T]) -> T:
    try:
        return await call
    except RequestError as exc:
        await _abort(context, grpc_code(exc.code), exc.message)


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
