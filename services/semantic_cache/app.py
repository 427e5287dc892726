"""semantic-cache: the process. Validates its environment, builds everything, serves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import faiss
import grpc

from cachemesh.v1 import semantic_cache_pb2, semantic_cache_pb2_grpc
from services.common.auth import InternalAuthInterceptor
from services.common.clock import SystemClock
from services.common.config import Env
from services.common.server import ServerSettings, ServiceSpec, configure_logging, run_service
from services.common.telemetry import build_tracer_provider, server_interceptors
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.config import SemanticCacheConfig
from services.semantic_cache.embedder import load_minilm_embedder
from services.semantic_cache.servicer import SemanticCacheService

NAME = "semantic-cache"
DEFAULT_LISTEN = "127.0.0.1:50052"
SERVICE_NAME = semantic_cache_pb2.DESCRIPTOR.services_by_name["SemanticCache"].full_name


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    env = Env(environ)
    configure_logging(env)
    settings = ServerSettings.from_env(env, "SEMANTIC_CACHE", DEFAULT_LISTEN)
    auth = InternalAuthInterceptor(env.str("CACHEMESH_INTERNAL_TOKEN"))
    config = SemanticCacheConfig.from_env(env)
    provider = build_tracer_provider(environ, NAME)
    faiss.omp_set_num_threads(config.faiss_threads)
    servicer = SemanticCacheService()

    async def warmup() -> None:
        embedder = await asyncio.to_thread(load_minilm_embedder, threads=config.ort_threads)
        await asyncio.to_thread(embedder.embed, ["warm-up"])  # the first run allocates
        servicer.attach(
            SemanticCache(
                embedder,
                SystemClock(),
                threshold=config.threshold,
                ttl_s=config.ttl_s,
                max_entries=config.max_entries,
            )
        )

    async def shutdown_tracing() -> None:
        await asyncio.to_thread(provider.shutdown)

    def register(server: grpc.aio.Server) -> None:
        semantic_cache_pb2_grpc.add_SemanticCacheServicer_to_server(servicer, server)

    spec = ServiceSpec(
        name=NAME,
        settings=settings,
        service_names=[SERVICE_NAME],
        register=register,
        interceptors=[*server_interceptors(provider), auth],
        warmup=warmup,
        on_stop=[shutdown_tracing],
    )
    await run_service(spec, stop)


def main() -> None:
    asyncio.run(serve(os.environ))
