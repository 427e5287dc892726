"""gRPC ``cachemesh.v1.PrefixCache``: the API's messages over the wire, its errors as codes."""

from __future__ import annotations

from typing import Any

import grpc

from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.common.status import answered
from services.prefix_cache.api import PrefixCacheApi

Context = grpc.aio.ServicerContext[Any, Any]


class PrefixCacheServicer(prefix_cache_pb2_grpc.PrefixCacheServicer):
    def __init__(self, api: PrefixCacheApi) -> None:
        self._api = api

    async def Plan(self, request: pc.PlanRequest, context: Context) -> pc.PlanResponse:
        return await answered(context, self._api.plan(request))

    async def Commit(self, request: pc.CommitRequest, context: Context) -> pc.CommitResponse:
        return await answered(context, self._api.commit(request))

    async def Totals(self, request: pc.TotalsRequest, context: Context) -> pc.TotalsResponse:
        return await answered(context, self._api.totals(request))

    async def TotalsBatch(
        self, request: pc.TotalsBatchRequest, context: Context
    ) -> pc.TotalsBatchResponse:
        return await answered(context, self._api.totals_batch(request))
