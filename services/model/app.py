"""Entry point of a model replica (cachemesh.v1.Model): the simulated engine, or a provider
adapter (MODEL_BACKEND=anthropic | openai)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.auth import InternalAuthInterceptor
from services.common.env import Env
from services.common.grace import GraceEnd
from services.common.logs import configure_logging
from services.common.metrics import (
    MetricsEndpoint,
    TenantLabels,
    TokenizerCacheCollector,
    new_registry,
)
from services.common.server import (
    HealthSwitch,
    ServiceSpec,
    run_main,
    run_service,
)
from services.common.telemetry import (
    SpanDrops,
    build_tracer_provider,
    server_interceptors,
    stop_tracing,
)
from services.common.tokens import Tokenizers, load_tokenizers
from services.common.unread import warn_unread_settings
from services.model.api import ModelApi
from services.model.kv_cache import KvBlockCache
from services.model.metrics import ModelMetrics
from services.model.servicer import ModelService
from services.model.settings import ModelSettings
from services.model.wiring import build_engine

if TYPE_CHECKING:
    from services.model.providers.api import ProviderApi

log = logging.getLogger("cachemesh.model")
SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["Model"].full_name


def warn_unused(settings: ModelSettings) -> None:
    """Names the provider settings set that this replica's backend does not read (checked all
    the same): a leftover, or a replica meant for another backend. Never their values."""
    if settings.unused:
        log.warning(
            "MODEL_BACKEND=%s does not read %s (set, and valid: only a replica of another "
            "backend would)",
            settings.backend,
            ", ".join(settings.unused),
        )


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    configure_logging(Env(environ))
    warn_unread_settings(environ, "model")
    settings = ModelSettings.from_env(environ)
    provider = build_tracer_provider(environ, "model")
    auth = InternalAuthInterceptor(settings.internal_token)
    registry = new_registry()
    registry.register(SpanDrops(provider))
    loaded: list[Tokenizers] = []  # the warm-up's
    registry.register(TokenizerCacheCollector(lambda: loaded[0] if loaded else ()))
    tenants = TenantLabels(settings.metrics.max_tenants)
    metrics = ModelMetrics(registry, settings.models, time.perf_counter, tenants)
    service = ModelService(settings.replica_id, metrics=metrics)
    kv_cache = KvBlockCache(settings.kv_capacity_blocks)
    health = HealthSwitch()
    apis: list[ProviderApi] = []

    async def warmup() -> None:
        # the vocabularies of the rows this replica serves, each once
        tokenizer = await asyncio.to_thread(
            load_tokenizers, settings.models.values(), settings.tokenizer_cache_tokens
        )
        loaded.append(tokenizer)
        if settings.provider is None:
            # this process's run of the engine: its KV cache (in memory) dies with the process
            run = uuid.uuid4().hex
            engine = build_engine(settings, tokenizer, kv_cache, metrics=metrics, instance=run)
            service.attach(ModelApi(engine))
        else:
            # only a provider replica loads the SDKs (anthropic, openai): importing them took
            # most of a simulated replica's start (seconds on a busy machine) for nothing
            from services.model.providers.wiring import build_provider_api

            apis.append(build_provider_api(settings, tokenizer, health.set, metrics))
            service.attach(apis[0])

    async def close_apis() -> None:
        for api in apis:
            await api.close()

    async def shutdown_tracing() -> None:
        await stop_tracing(provider)  # last: bounded, whatever the collector does

    warn_unused(settings)
    if settings.provider is None:
        log.info(
            "SIMULATED model engine (not a real LLM): replica %s serves %s; "
            "SIM_TIME_SCALE=%s, KV cache %d blocks of 16 tokens",
            settings.replica_id,
            ", ".join(settings.models),
            settings.time_scale,
            settings.kv_capacity_blocks,
        )
    else:
        log.info(
            "%s adapter: replica %s serves %s through %s (key %s)",
            settings.backend,
            settings.replica_id,
            ", ".join(f"{m}={s.upstream}" for m, s in settings.models.items()),
            settings.provider.shown_url,  # never its password
            "set" if settings.provider.api_key is not None else "none",
        )
    grace = GraceEnd()
    await run_service(
        ServiceSpec(
            name="model",
            settings=settings.server,
            service_names=[SERVICE_NAME],
            register=lambda server: model_pb2_grpc.add_ModelServicer_to_server(service, server),
            interceptors=[*server_interceptors(provider, grace), auth],
            grace_end=grace,  # a call cut when the grace ends: UNAVAILABLE on its span
            warmup=warmup,
            on_stop=[close_apis, shutdown_tracing],
            health=health,
            metrics=MetricsEndpoint(settings.metrics, registry),
        ),
        stop,
    )


def main() -> None:
    run_main("model", serve)
