"""The router process: builds every object from the environment, then serves the Gateway."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping

import grpc

from cachemesh.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.common.auth import internal_metadata
from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import SystemClock
from services.common.env import ConfigError, Env
from services.common.grace import GraceEnd
from services.common.logs import configure_logging
from services.common.metrics import (
    MetricsEndpoint,
    TenantLabels,
    TokenizerCacheCollector,
    new_registry,
)
from services.common.model_overrides import model_table_from_env
from services.common.server import ServiceSpec, run_every, run_main, run_service
from services.common.telemetry import (
    SpanDrops,
    build_tracer_provider,
    server_interceptors,
    stop_tracing,
)
from services.common.tokens import load_tokenizers
from services.common.unread import warn_unread_settings
from services.router.access_log import RequestLog
from services.router.admin import AdminServicer
from services.router.admin_auth import AuthFailures
from services.router.billing import billed_layer
from services.router.grpc_adapters import CallTiming, connect
from services.router.idempotency import IdempotencyTable
from services.router.limit_wiring import (
    build_answer_ledger,
    build_limiter,
    ledger_breaker,
    tenant_policies,
)
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, RouterModelError, load_router_model
from services.router.routing.router import LocalEmbedder
from services.router.servicer import LEDGER_TIMEOUT_S, GatewayServicer
from services.router.settings import RouterSettings
from services.semantic_cache.embedder import (
    EmbedderLoadError,
    checked_minilm_files,
    load_minilm_embedder,
)

log = logging.getLogger(__name__)
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
# How long, after gRPC's server has stopped (the grace is over), the Gateway handlers it
# cancelled may take to unwind: a few loop turns each (their bills are only scheduled then).
HANDLERS_END_S = 2.0
# How long the L1 Stores still running may take once the bills are sent or kept: each has a
# 10 s deadline of its own, which would outlast the stack's SIGKILL (grace + 5 s); one cut off
# costs only a future hit.
STORES_END_S = 0.5


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    env = Env(environ)
    lines = configure_logging(env)
    warn_unread_settings(environ, "router")
    table = model_table_from_env(env)
    settings = RouterSettings.from_env(env, table)
    # first: a data directory another router holds stops this one before anything loads
    # (held until the process exits)
    journal = Journal(settings.data_dir) if settings.data_dir is not None else None
    keys = settings.keys.open(time.monotonic, time.time)
    # each tenant's limits: the settings', or its own (the per-tenant limits file)
    policies = tenant_policies(settings.limits, settings.keys, time.monotonic, time.time)
    if settings.admin is None:
        log.warning("the Admin API is off: no CACHEMESH_ADMIN_TOKEN_FILE or CACHEMESH_ADMIN_TOKEN")
    provider = build_tracer_provider(environ, "router", edge=True)
    # the vocabularies of the rows this router serves (MODEL_REPLICAS, auto's tiers among
    # them), each loaded once: o200k_base only when an OpenAI row is deployed
    tokenizer = load_tokenizers(
        (table.models[model] for model in settings.replicas), settings.tokenizer_cache_tokens
    )
    try:
        card = RouterCard.load()
        router_model = load_router_model(card=card)  # weights the card does not pin: refused
        # ROUTER_THRESHOLD, else the card's calibrated one (a card not calibrated: refused)
        threshold = card.threshold(settings.routing_threshold)
    except RouterModelError as exc:  # a broken install stops the router as a bad setting does
        raise ConfigError(f"the learned router's model: {exc}") from exc
    local = None
    if settings.local_embedder:
        # loaded on first need (the semantic cache down), its files checked now: a broken
        # install stops the start, naming the file, not the first `auto` request of an outage
        try:
            await asyncio.to_thread(checked_minilm_files)
        except EmbedderLoadError as exc:
            raise ConfigError(
                f"ROUTER_LOCAL_EMBEDDER: the router's own embedder: {exc} (or set "
                "ROUTER_LOCAL_EMBEDDER=false: shape features alone when the semantic cache is down)"
            ) from exc
        local = LocalEmbedder(load_minilm_embedder)
    registry = new_registry()
    registry.register(SpanDrops(provider))
    registry.register(TokenizerCacheCollector(lambda: tokenizer))
    metrics = RouterMetrics(registry, TenantLabels(settings.metrics.max_tenants))
    # the key file's tenants and the served rows at 0 from the start, so rate() sees each
    # series' first event (tenants keyed later appear at their first request)
    metrics.known(
        (record.tenant for record in keys.records() if record.active),
        (table.models[model] for model in settings.replicas),
    )
    connected = connect(
        settings, provider.get_tracer("cachemesh.grpc"), CallTiming(metrics.dependency)
    )
    tracer = provider.get_tracer("cachemesh.router")
    wall = SystemClock()  # the outbox's open calls' starts, the limiter's time since, arrivals
    limiter = await build_limiter(
        settings.limits,
        wall,
        table,
        tokenizer,
        tracer,
        metrics.degraded,
        metrics.settles_lost,
        reset=metrics.limits_store_reset,
        breaker_opened=metrics.redis_breaker_opened,
        policies=policies,
    )
    outbox = BillingOutbox(
        connected.dependencies.prefix,
        journal,
        settings.prefix_timeout_s,
        settings.outbox_retry_s,
        tracer=tracer,
        max_memory_bytes=settings.outbox_max_bytes,
        open_calls_settled=metrics.open_calls_settled,
        dropped=metrics.outbox_dropped,
        # a killed router's calls, billed now (prefix-cache's first reply to their FINAL):
        # their cost counts against the budgets of the periods they started in
        open_call_billed=lambda bill: limiter.count_unticketed(
            bill.tenant, bill.cost_nanos, started_ms=bill.started_ms
        ),
        wall=wall,
        journal_sync_s=settings.journal_sync_s,
        # an answer counted at its estimate while prefix-cache was down, now billed: the
        # budgets of the period it was counted in are corrected by the difference
        estimate_billed=limiter.reconcile,
        journal_sync_failed=metrics.journal_sync_failed,
        # a bill kept while prefix-cache is down: its estimate counts as its line is written
        estimate_kept=limiter.count_estimate,
        # once prefix-cache says SERVING, the try of a bill that found it down is traced again
        prefix_serving=connected.prefix_health.serving,
        # a replayed bill's layer, on its replay span with what it was billed
        billed_layer=functools.partial(billed_layer, table),
        # the cost counters counted a kept bill's estimate (a killed router's call, nothing):
        # the replay's bill corrects them, so they sum to what was billed
        cost_corrected=metrics.cost_corrected,
    )
    metrics.outbox_backlog(outbox.backlog)  # its pending bills and their oldest's age
    pipeline = Pipeline(
        connected.dependencies,
        table,
        tokenizer,
        tracer,
        settings,
        (router_model, threshold, local),
        outbox,
        metrics=metrics,
        wall=wall,  # the arrival a WARM without a Plan carries, on prefix-cache's time of day
    )
    answers = IdempotencyTable.in_process(
        settings.idempotency_ttl_s,
        settings.idempotency_max,
        settings.idempotency_max_bytes,
    )
    ledger = await build_answer_ledger(
        settings.answers_redis_url,
        settings.idempotency_ttl_s,
        settings.limits.redis_max_connections,
        LEDGER_TIMEOUT_S,
        metrics.ledger_failed,
    )
    if ledger is None:
        log.info("ROUTER_ANSWERS_REDIS_URL unset: retries are answered once per router only")
    requests = RequestLog(metrics, table, time.perf_counter, lines)
    # set when the drain's grace ends: the calls gRPC cuts then are UNAVAILABLE (span, access
    # line, metric), as their callers see them, not a caller's CANCELLED
    grace = GraceEnd()
    servicer = GatewayServicer(
        keys,
        table,
        set(settings.replicas),
        pipeline,
        answers,
        limiter,
        requests,
        ledger,
        ledger_failed=metrics.ledger_failed,
        ledger_breaker=ledger_breaker(settings.limits, metrics.redis_breaker_opened),
        grace_end=grace,
        max_request_bytes=settings.max_request_bytes,
    )
    admin = AdminServicer(
        settings.admin,
        keys,
        connected.semantic,
        connected.prefix,
        internal_metadata(settings.internal_token),
        settings.admin_timeout_s,
        auth_failures=AuthFailures(time.monotonic, metrics.admin_auth_failed),
        limits=policies,
    )

    def register(server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        admin_pb2_grpc.add_AdminServicer_to_server(admin, server)

    replays: list[asyncio.Task[None]] = []

    async def warmup() -> None:
        replays.append(asyncio.create_task(outbox.run(), name="billing-outbox-replay"))

    def malformed(method: str) -> None:
        service, _, name = method.rpartition("/")
        if service == f"/{GATEWAY}":  # a Gateway call: its metrics and access-log line
            requests.refused(name, "INVALID_ARGUMENT")

    async def stop_replays() -> None:
        # bounded: a replay that took its cancel and went on held the stop forever, past the
        # SIGKILL, and with it the outbox's last flush, the limits' last settles, the spans
        await cancel_within(replays, TASKS_END_S, "router stop")

    async def close_ledger() -> None:
        if ledger is not None:
            await ledger.close()

    async def shutdown_tracing() -> None:
        await stop_tracing(provider)  # last: bounded, whatever the collector does

    async def handlers_ended() -> None:
        # the calls gRPC cut at the end of the grace: their bills are scheduled as they unwind
        if not await servicer.handlers_ended(HANDLERS_END_S):
            log.error(
                "Gateway handlers still running %.0f s after the server stopped: the bills "
                "of their model calls may be lost",
                HANDLERS_END_S,
            )

    async def end_stores() -> None:
        await pipeline.end_stores(STORES_END_S)

    async def close() -> None:
        # every step runs even when one fails: the outbox's last flush must not be skipped
        # because a Redis connection failed to close
        await run_every(
            [
                handlers_ended,
                pipeline.drain_bills,  # the bills of the calls cut, sent or kept in the outbox
                limiter.drain,  # their counts sent before the outbox's flush, however long
                close_ledger,
                stop_replays,
                outbox.close,  # a last try; what is left stays in the journal, or is logged
                limiter.close,  # after the outbox: a killed router's calls it bills count too
                end_stores,  # L1 Stores last, briefly: a lost one costs only a future hit
                connected.close,
                shutdown_tracing,
            ],
            "router stop",
        )

    await run_service(
        ServiceSpec(
            name="router",
            settings=settings.server,
            service_names=[GATEWAY, ADMIN],
            register=register,
            interceptors=server_interceptors(provider, grace, callers_baggage=False),
            grace_end=grace,
            warmup=warmup,
            on_stop=[close],
            metrics=MetricsEndpoint(settings.metrics, registry),
            malformed=malformed,
        ),
        stop,
    )


def main() -> None:
    run_main("router", serve)
