"""gRPC ``cachemesh.v1.SemanticCache``: translates protos to cache records and errors to codes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, NoReturn

import grpc

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.query import query_from_request
from services.semantic_cache.records import Answer, InvalidQuery

Context = grpc.aio.ServicerContext[Any, Any]


class SemanticCacheService(sc_grpc.SemanticCacheServicer):
    """Serves a ``SemanticCache``; UNAVAILABLE until one is attached (after the warm-up)."""

    def __init__(
        self,
        cache: SemanticCache | None = None,
        lease_wait_s: float = 0.0,
        draining: asyncio.Event | None = None,
    ) -> None:
        self._cache = cache
        self._lease_wait_s = lease_wait_s  # the most a lookup waits on another's lease
        self._draining = draining  # once set, writes are refused (UNAVAILABLE)

    def attach(self, cache: SemanticCache) -> None:
        self._cache = cache

    async def Lookup(self, request: sc.LookupRequest, context: Context) -> sc.LookupResponse:
        cache = await self._ready(context)
        await _require_tenant(request.tenant, context)
        draining = self._is_draining()
        try:
            query = query_from_request(request.tenant, request.request)
            # a draining cache refuses Stores, so it leads no model call and makes none wait
            wait_s = 0.0 if draining else self._wait_budget(context)
            result = await cache.check(query, wait_s, lead=not draining)
        except InvalidQuery as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = sc.LookupResponse(
            pending=result.pending,
            hit=result.hit,
            best_similarity=result.best_similarity,
            skip_reason=result.skip_reason,
            leader=result.leader,
            lease_id=result.lease_id,
            waited=result.waited,
            refusal=result.refusal,
        )
        if result.entry is not None:
            response.match.CopyFrom(
                pb.SemanticMatch(
                    similarity=result.similarity,
                    entry_id=result.entry.entry_id,
                    exact=result.exact,
                )
            )
            response.answer.ParseFromString(result.entry.answer.payload)
        return response

    async def Store(self, request: sc.StoreRequest, context: Context) -> sc.StoreResponse:
        cache = await self._ready(context)
        await _require_tenant(request.tenant, context)
        if self._is_draining():
            with contextlib.suppress(InvalidQuery):  # a refused Store still ends its lease
                cache.release(query_from_request(request.tenant, request.request))
        await self._refuse_if_draining(context)
        answer = request.answer
        if answer.output_tokens < 0:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "answer.output_tokens must be >= 0"
            )
        record = Answer(
            payload=answer.SerializeToString(deterministic=True),
            stop_reason=answer.stop_reason,
            output_tokens=answer.output_tokens,
            has_tool_use=any(b.WhichOneof("kind") == "tool_use" for b in answer.content),
        )
        try:
            result = await cache.store(query_from_request(request.tenant, request.request), record)
        except InvalidQuery as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return sc.StoreResponse(
            stored=result.stored, entry_id=result.entry_id, skip_reason=result.skip_reason
        )

    async def Drop(self, request: sc.DropRequest, context: Context) -> sc.DropResponse:
        cache = await self._ready(context)
        await self._refuse_if_draining(context)
        await _require_tenant(request.tenant, context)
        if request.entry_id:
            dropped = cache.drop_entry(request.tenant, request.entry_id)
        else:
            dropped = cache.drop(request.tenant, request.namespace or None)
        await cache.sync_journal()  # durable before it is acknowledged
        return sc.DropResponse(dropped=dropped)

    async def Release(self, request: sc.ReleaseRequest, context: Context) -> sc.ReleaseResponse:
        cache = await self._ready(context)
        await _require_tenant(request.tenant, context)
        try:
            query = query_from_request(request.tenant, request.request)
        except InvalidQuery as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return sc.ReleaseResponse(released=cache.release(query, request.lease_id or None))

    def _is_draining(self) -> bool:
        return self._draining is not None and self._draining.is_set()

    async def _refuse_if_draining(self, context: Context) -> None:
        if self._is_draining():
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "semantic-cache is draining for shutdown: writes are refused; retry elsewhere",
            )

    def _wait_budget(self, context: Context) -> float:
        """The lease wait: the configured limit, within the caller's deadline less 100 ms."""
        if self._lease_wait_s <= 0:
            return 0.0
        remaining = context.time_remaining()
        if remaining is None:
            return self._lease_wait_s
        return max(0.0, min(self._lease_wait_s, remaining - 0.1))

    async def _ready(self, context: Context) -> SemanticCache:
        if self._cache is None:
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "semantic-cache is still loading its embedding model; retry shortly",
            )
        return self._cache


async def _require_tenant(tenant: str, context: Context) -> None:
    if not tenant:
        await _abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "tenant is required: the router must pass the caller's tenant",
        )


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
