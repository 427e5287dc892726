"""The router process: builds every object from the environment, then serves the Gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from cachemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.auth import ApiKeys
from services.common.clock import SystemClock
from services.common.env import Env
from services.common.logs import configure_logging
from services.common.metrics import MetricsEndpoint, TenantLabels, new_registry
from services.common.models import model_table_from_env
from services.common.server import ServiceSpec, run_main, run_service
from services.common.telemetry import build_tracer_provider, server_interceptors
from services.common.tokens import load_cl100k
from services.router.access_log import RequestLog
from services.router.grpc_adapters import CallTiming, connect
from services.router.idempotency import IdempotencyTable
from services.router.limit_wiring import build_limiter
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox, Journal
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from services.router.routing.router import LocalEmbedder
from services.router.servicer import GatewayServicer
from services.router.settings import RouterSettings
from services.semantic_cache.embedder import load_minilm_embedder

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    env = Env(environ)
    lines = configure_logging(env)
    table = model_table_from_env(env)
    settings = RouterSettings.from_env(env, table)
    keys = ApiKeys.from_file(settings.api_keys_file)
    provider = build_tracer_provider(environ, "router")
    tokenizer = load_cl100k()
    card = RouterCard.load()
    router_model = load_router_model(card=card)  # a weights file the card does not pin: refused
    threshold = (
        settings.routing_threshold
        if settings.routing_threshold is not None
        else card.default_threshold
    )
    local = LocalEmbedder(load_minilm_embedder) if settings.local_embedder else None
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(settings.metrics.max_tenants))
    connected = connect(
        settings, provider.get_tracer("cachemesh.grpc"), CallTiming(metrics.dependency)
    )
    outbox = BillingOutbox(
        connected.dependencies.prefix,
        Journal(settings.data_dir) if settings.data_dir is not None else None,
        settings.prefix_timeout_s,
        settings.outbox_retry_s,
    )
    pipeline = Pipeline(
        connected.dependencies,
        table,
        tokenizer,
        provider.get_tracer("cachemesh.router"),
        settings,
        (router_model, threshold, local),
        outbox,
        metrics,
    )
    answers = IdempotencyTable(SystemClock(), settings.idempotency_ttl_s, settings.idempotency_max)
    limiter = await build_limiter(settings.limits, SystemClock())
    requests = RequestLog(metrics, table, time.perf_counter, lines)
    servicer = GatewayServicer(
        keys, table, set(settings.replicas), pipeline, answers, limiter, requests
    )

    replays: list[asyncio.Task[None]] = []

    async def warmup() -> None:
        replays.append(asyncio.ensure_future(outbox.run()))

    async def close() -> None:
        await pipeline.drain()
        await limiter.close()
        for task in replays:
            task.cancel()
        await asyncio.gather(*replays, return_exceptions=True)
        await outbox.flush()  # a last try; what is left stays in the journal
        await connected.close()
        provider.shutdown()

    await run_service(
        ServiceSpec(
            name="router",
            settings=settings.server,
            service_names=[GATEWAY],
            register=lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(
                servicer, server
            ),
            interceptors=server_interceptors(provider),
            warmup=warmup,
            on_stop=[close],
            metrics=MetricsEndpoint(settings.metrics, registry),
        ),
        stop,
    )


def main() -> None:
    run_main("router", serve)
