"""Entry point of the simulated model replica (cachemesh.v1.Model)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.auth import InternalAuthInterceptor
from services.common.env import Env
from services.common.server import ServiceSpec, configure_logging, run_main, run_service
from services.common.telemetry import build_tracer_provider, server_interceptors
from services.common.tokens import load_cl100k
from services.model.api import ModelApi
from services.model.kv_cache import KvBlockCache
from services.model.servicer import ModelService
from services.model.settings import ModelSettings
from services.model.wiring import build_engine

log = logging.getLogger("cachemesh.model")
SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["Model"].full_name


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    configure_logging(Env(environ))
    settings = ModelSettings.from_env(environ)
    provider = build_tracer_provider(environ, "model")
    auth = InternalAuthInterceptor(settings.internal_token)
    service = ModelService(settings.replica_id)
    kv_cache = KvBlockCache(settings.kv_capacity_blocks)

    async def warmup() -> None:
        tokenizer = await asyncio.to_thread(load_cl100k)
        service.attach(ModelApi(build_engine(settings, tokenizer, kv_cache)))

    async def shutdown_tracing() -> None:
        provider.shutdown()

    log.info(
        "SIMULATED model engine (not a real LLM): replica %s serves %s; "
        "SIM_TIME_SCALE=%s, KV cache %d blocks of 16 tokens",
        settings.replica_id,
        ", ".join(settings.models),
        settings.time_scale,
        settings.kv_capacity_blocks,
    )
    await run_service(
        ServiceSpec(
            name="model",
            settings=settings.server,
            service_names=[SERVICE_NAME],
            register=lambda server: model_pb2_grpc.add_ModelServicer_to_server(service, server),
            interceptors=[*server_interceptors(provider), auth],
            warmup=warmup,
            on_stop=[shutdown_tracing],
        ),
        stop,
    )


def main() -> None:
    run_main("model", serve)
