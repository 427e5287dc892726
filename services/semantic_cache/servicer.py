"""gRPC ``cachemesh.v1.SemanticCache``: the API's messages over the wire, its errors as codes."""

from __future__ import annotations

from typing import Any

import grpc

from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.errors import RequestError
from services.common.status import abort, answered, grpc_code
from services.semantic_cache.api import SemanticCacheApi

Context = grpc.aio.ServicerContext[Any, Any]


class SemanticCacheService(sc_grpc.SemanticCacheServicer):
    """Serves a ``SemanticCacheApi``; UNAVAILABLE until one is attached (after the warm-up)."""

    def __init__(self, api: SemanticCacheApi | None = None) -> None:
        self._api = api

    def attach(self, api: SemanticCacheApi) -> None:
        self._api = api

    async def Lookup(self, request: sc.LookupRequest, context: Context) -> sc.LookupResponse:
        api = await self._ready(context)
        reply = await answered(context, api.lookup(request, context.time_remaining()))
        if reply.leader and context.time_remaining() == 0:
            # past the caller's deadline (a busy event loop): this reply will not reach it, so
            # the lease it names would be neither renewed nor released (a cancelled lookup's
            # lease is ended in ``lookup``)
            api.abandon(request.tenant, reply.lease_id, request.request.request_id)
        return reply

    async def Store(self, request: sc.StoreRequest, context: Context) -> sc.StoreResponse:
        api = await self._ready(context)
        return await answered(context, api.store(request))

    async def Drop(self, request: sc.DropRequest, context: Context) -> sc.DropResponse:
        api = await self._ready(context)
        return await answered(context, api.drop(request))

    async def Release(self, request: sc.ReleaseRequest, context: Context) -> sc.ReleaseResponse:
        api = await self._ready(context)
        return await answered(context, api.release(request))

    async def Renew(self, request: sc.RenewRequest, context: Context) -> sc.RenewResponse:
        api = await self._ready(context)
        return await answered(context, api.renew(request))

    async def Stats(self, request: sc.L1StatsRequest, context: Context) -> sc.L1StatsResponse:
        api = await self._ready(context)
        try:
            return api.stats(request)
        except RequestError as exc:  # a tenant named as no key file could name it
            await abort(context, grpc_code(exc.code), exc.message)

    async def GetPolicy(self, request: sc.L1PolicyRequest, context: Context) -> sc.L1Policy:
        api = await self._ready(context)
        return await answered(context, api.get_policy(request))

    async def SetPolicy(self, request: sc.SetL1PolicyRequest, context: Context) -> sc.L1Policy:
        api = await self._ready(context)
        return await answered(context, api.set_policy(request))

    async def _ready(self, context: Context) -> SemanticCacheApi:
        if self._api is None:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "semantic-cache is still loading its embedding model; retry shortly",
            )
        return self._api
