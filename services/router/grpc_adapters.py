"""The router's dependencies over gRPC: traced channels carrying the internal credential.

The only place the router's pipeline meets the transport: a failed call's
``grpc.aio.AioRpcError`` becomes ``CallFailed`` with the same status code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from cachemesh.v1 import model_pb2, model_pb2_grpc, prefix_cache_pb2_grpc, semantic_cache_pb2_grpc
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.auth import internal_metadata
from services.common.status import code_of
from services.router.dependencies import CallFailed, Dependencies
from services.router.settings import RouterSettings

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


def failed(exc: grpc.aio.AioRpcError) -> CallFailed:
    return CallFailed(code_of(exc.code()), exc.details() or exc.code().name)


async def _call(reply: Awaitable[T]) -> T:
    try:
        return await reply
    except grpc.aio.AioRpcError as exc:
        raise failed(exc) from exc


@dataclass
class GrpcSemantic:
    stub: semantic_cache_pb2_grpc.SemanticCacheAsyncStub
    metadata: Metadata

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        return await _call(self.stub.Lookup(request, timeout=deadline_s, metadata=self.metadata))

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        return await _call(self.stub.Store(request, timeout=deadline_s, metadata=self.metadata))

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        return await _call(self.stub.Release(request, timeout=deadline_s, metadata=self.metadata))


@dataclass
class GrpcPrefix:
    stub: prefix_cache_pb2_grpc.PrefixCacheAsyncStub
    metadata: Metadata

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return await _call(self.stub.Plan(request, timeout=deadline_s, metadata=self.metadata))

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        return await _call(self.stub.Commit(request, timeout=deadline_s, metadata=self.metadata))


class GrpcModelStream:
    def __init__(
        self, call: grpc.aio.UnaryStreamCall[model_pb2.GenerateRequest, model_pb2.GenerateChunk]
    ) -> None:
        self._call = call

    async def read(self) -> model_pb2.GenerateChunk | None:
        try:
            chunk = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise failed(exc) from exc
        if chunk is grpc.aio.EOF:
            return None
        assert isinstance(chunk, model_pb2.GenerateChunk)
        return chunk

    def cancel(self) -> None:
        self._call.cancel()


@dataclass
class GrpcModels:
    stubs: dict[str, model_pb2_grpc.ModelAsyncStub]  # replica address -> stub
    metadata: Metadata

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> GrpcModelStream:
        call = self.stubs[replica].Generate(request, timeout=deadline_s, metadata=self.metadata)
        return GrpcModelStream(call)


@dataclass
class Connected:
    dependencies: Dependencies
    channels: list[grpc.aio.Channel]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def connect(
    settings: RouterSettings, interceptors: Sequence[grpc.aio.ClientInterceptor]
) -> Connected:
    channels: dict[str, grpc.aio.Channel] = {}

    def channel(address: str) -> grpc.aio.Channel:
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(
                address,
                interceptors=list(interceptors),
                options=[
                    ("grpc.max_send_message_length", 8 * 1024 * 1024),
                    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ],
            )
        return channels[address]

    metadata = internal_metadata(settings.internal_token)
    dependencies = Dependencies(
        semantic=GrpcSemantic(
            semantic_cache_pb2_grpc.SemanticCacheStub(channel(settings.semantic_cache_addr)),
            metadata,
        ),
        prefix=GrpcPrefix(
            prefix_cache_pb2_grpc.PrefixCacheStub(channel(settings.prefix_cache_addr)), metadata
        ),
        model=GrpcModels(
            {
                address: model_pb2_grpc.ModelStub(channel(address))
                for addresses in settings.replicas.values()
                for address in addresses
            },
            metadata,
        ),
        models=dict(settings.replicas),
    )
    return Connected(dependencies, list(channels.values()))
