"""The router's dependencies answered in this process by the services' own APIs (no sockets).

Each adapter calls the service's transport-free API directly and turns its ``RequestError``
into the ``CallFailed`` a gRPC call would raise; deadlines are the caller's, whole (nothing in
process spends wall-clock time on the wire).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import TypeVar

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import RequestError
from services.model.api import ModelApi
from services.prefix_cache.api import PrefixCacheApi
from services.router.dependencies import CallFailed
from services.semantic_cache.api import SemanticCacheApi

T = TypeVar("T")


async def _local(call: Awaitable[T]) -> T:
    try:
        return await call
    except RequestError as exc:
        raise CallFailed(exc.code, exc.message) from exc


class LocalSemantic:
    def __init__(self, api: SemanticCacheApi) -> None:
        self._api = api

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        return await _local(self._api.lookup(request, deadline_s))

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        return await _local(self._api.store(request))

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        return await _local(self._api.release(request))


class LocalPrefix:
    def __init__(self, api: PrefixCacheApi) -> None:
        self._api = api

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return await _local(self._api.plan(request))

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        return await _local(self._api.commit(request))


class LocalModelStream:
    def __init__(self, chunks: AsyncGenerator[model_pb2.GenerateChunk, None]) -> None:
        self._chunks = chunks
        self._closing: set[asyncio.Task[None]] = set()

    async def read(self) -> model_pb2.GenerateChunk | None:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message, exc.reason) from exc

    def cancel(self) -> None:
        task = asyncio.ensure_future(self._chunks.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class LocalModels:
    def __init__(self, apis: Mapping[str, ModelApi]) -> None:
        self._apis = dict(apis)  # replica address -> its engine's API

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> LocalModelStream:
        return LocalModelStream(self._apis[replica].generate(request))
