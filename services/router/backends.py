"""The router's channels to its dependencies, traced and carrying the internal credential."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from cachemesh.v1 import model_pb2_grpc, prefix_cache_pb2_grpc, semantic_cache_pb2_grpc
from services.common.auth import internal_metadata
from services.router.settings import RouterSettings


@dataclass
class Backends:
    semantic: semantic_cache_pb2_grpc.SemanticCacheAsyncStub
    prefix: prefix_cache_pb2_grpc.PrefixCacheAsyncStub
    models: dict[str, tuple[str, ...]]  # model id -> replica addresses
    replica_stubs: dict[str, model_pb2_grpc.ModelAsyncStub]
    metadata: tuple[tuple[str, str], ...]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    _rotation: dict[str, Iterator[int]] = field(default_factory=dict)

    def replicas(self, model: str) -> tuple[str, ...]:
        return self.models.get(model, ())

    def rotate(self, model: str, replicas: Sequence[str]) -> list[str]:
        """The replicas in round-robin order (used when prefix-cache cannot rank them)."""
        if not replicas:
            return []
        counter = self._rotation.setdefault(model, itertools.count())
        start = next(counter) % len(replicas)
        return [*replicas[start:], *replicas[:start]]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def connect(
    settings: RouterSettings, interceptors: Sequence[grpc.aio.ClientInterceptor]
) -> Backends:
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

    semantic = semantic_cache_pb2_grpc.SemanticCacheStub(channel(settings.semantic_cache_addr))
    prefix = prefix_cache_pb2_grpc.PrefixCacheStub(channel(settings.prefix_cache_addr))
    stubs = {
        address: model_pb2_grpc.ModelStub(channel(address))
        for addresses in settings.replicas.values()
        for address in addresses
    }
    return Backends(
        semantic=semantic,
        prefix=prefix,
        models=dict(settings.replicas),
        replica_stubs=stubs,
        metadata=internal_metadata(settings.internal_token),
        channels=list(channels.values()),
    )
