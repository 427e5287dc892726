"""semantic-cache: the process. Validates its environment, builds everything, serves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace

import faiss
import grpc

from cachemesh.v1 import semantic_cache_pb2, semantic_cache_pb2_grpc
from services.common.auth import InternalAuthInterceptor, internal_token_from_env
from services.common.clock import SystemClock
from services.common.env import ConfigError, Env
from services.common.logs import configure_logging
from services.common.metrics import MetricsEndpoint, MetricsSettings, TenantLabels, new_registry
from services.common.private_files import tighten, with_entries
from services.common.server import (
    DRAIN_REFUSAL_S,
    ServerSettings,
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
from services.common.unread import warn_unread_settings
from services.semantic_cache.embedder import load_minilm_embedder
from services.semantic_cache.metrics import SemanticCacheMetrics, StoreCollector
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.persistence import (
    LOCK_NAME,
    SNAPSHOT_NAME,
    WAL_NAME,
    DirectoryInUse,
    SnapshotStore,
)
from services.semantic_cache.servicer import SemanticCacheService
from services.semantic_cache.settings import DATA_DIR, SemanticCacheSettings
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.stats import StoreStats
from services.semantic_cache.tenant_policy import FILE_NAME, PolicyError, TenantPolicies
from services.semantic_cache.wal import WriteAheadLog
from services.semantic_cache.wiring import build_api, build_cache, build_verifier

NAME = "semantic-cache"
DEFAULT_LISTEN = "127.0.0.1:50052"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9102"
SERVICE_NAME = semantic_cache_pb2.DESCRIPTOR.services_by_name["SemanticCache"].full_name
WAL_DIR = WAL_NAME  # the write-ahead log's segments, in the data directory
log = logging.getLogger("cachemesh.semantic_cache.persistence")


async def serve(environ: Mapping[str, str], stop: asyncio.Event | None = None) -> None:
    env = Env(environ)
    configure_logging(env)
    warn_unread_settings(environ, NAME)
    # writes racing a SIGTERM reach the servicer and are refused with UNAVAILABLE (the reason)
    settings = replace(
        ServerSettings.from_env(env, "SEMANTIC_CACHE", DEFAULT_LISTEN), refusal_s=DRAIN_REFUSAL_S
    )
    metrics_settings = MetricsSettings.from_env(env, "SEMANTIC_CACHE", DEFAULT_METRICS_LISTEN)
    auth = InternalAuthInterceptor(internal_token_from_env(env))
    config = SemanticCacheSettings.from_env(env, OperatingPoint.load())
    clock = SystemClock()
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(metrics_settings.max_tenants))
    stats = StoreStats()
    registry.register(StoreCollector(stats, metrics_settings.max_tenants))
    store = _store(config)  # holds the data directory's lock until the process is done
    snapshotter: Snapshotter | None = None
    try:
        snapshotter = _snapshotter(config, store, clock, metrics)
        policies = _policies(config)
        provider = build_tracer_provider(environ, NAME)
        registry.register(SpanDrops(provider))
        faiss.omp_set_num_threads(config.faiss_threads)
        stop = stop if stop is not None else asyncio.Event()  # set when the drain begins
        servicer = SemanticCacheService()

        async def warmup() -> None:
            embedder = await asyncio.to_thread(load_minilm_embedder, threads=config.ort_threads)
            await asyncio.to_thread(embedder.embed, ["warm-up"])  # the first run allocates
            solo = None
            if config.ort_solo_threads not in (0, config.ort_threads):  # costs a second session
                solo = await asyncio.to_thread(embedder.with_threads, config.ort_solo_threads)
                await asyncio.to_thread(solo.embed, ["warm-up"])
            verifier = await asyncio.to_thread(build_verifier, config, embedder)
            await asyncio.to_thread(verifier.accepts_all, [("warm-up", "warm up", 0.9)])
            cache = build_cache(config, embedder, clock, stats, metrics, verifier, solo)
            if snapshotter is not None:
                await snapshotter.open(cache)  # a corrupt snapshot stops the start-up here
            on_drop = snapshotter.dropped if snapshotter is not None else None
            servicer.attach(
                build_api(
                    config,
                    cache,
                    draining=stop,
                    policies=policies,
                    metrics=metrics,
                    on_drop=on_drop,
                )
            )

        async def shutdown_tracing() -> None:
            await stop_tracing(provider)  # last: bounded, whatever the collector does

        async def save_snapshot() -> None:
            if snapshotter is not None:
                await snapshotter.stop()  # the server has drained: nothing changes any more

        def register(server: grpc.aio.Server) -> None:
            semantic_cache_pb2_grpc.add_SemanticCacheServicer_to_server(servicer, server)

        spec = ServiceSpec(
            name=NAME,
            settings=settings,
            service_names=[SERVICE_NAME],
            register=register,
            interceptors=[*server_interceptors(provider), auth],
            warmup=warmup,
            # the last save first (a failed one is the exit error), never after the collector
            on_stop=[save_snapshot, shutdown_tracing],
            metrics=MetricsEndpoint(metrics_settings, registry),
        )
        await run_service(spec, stop)
    finally:
        if snapshotter is not None:
            # a SIGTERM during the warm-up cancelled it, not the replay's thread: the lock is
            # released only once no thread of this process changes the directory (the stop
            # has waited for it already unless it was itself cancelled)
            await asyncio.shield(snapshotter.join())
        if store is not None:
            store.close()  # after the last save (``run_service`` ran it)


def _store(config: SemanticCacheSettings) -> SnapshotStore | None:
    """The data directory's snapshot store, prepared and locked (None without one)."""
    if config.data_dir is None:
        return None
    store = SnapshotStore(config.data_dir)
    try:
        store.prepare()
    except DirectoryInUse as exc:
        raise ConfigError(
            f"{DATA_DIR}={config.data_dir}: another semantic-cache process is using the "
            f"directory ({exc.holder or 'pid unknown'} holds its {LOCK_NAME}); give each "
            "process a data directory of its own, or start this one once the other has stopped"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{DATA_DIR}={config.data_dir}: cannot create or write the directory ({exc})"
        ) from exc
    # every tenant's prompts and answers: 0600 / 0700, however an older version left them
    data_dir = config.data_dir
    names = (LOCK_NAME, SNAPSHOT_NAME, FILE_NAME)
    paths = [data_dir, *(data_dir / name for name in names), *with_entries(data_dir / WAL_DIR)]
    tighten(paths, DATA_DIR, log)
    return store


def _snapshotter(
    config: SemanticCacheSettings,
    store: SnapshotStore | None,
    clock: SystemClock,
    metrics: SemanticCacheMetrics,
) -> Snapshotter | None:
    if store is None or config.data_dir is None:
        return None
    wal = WriteAheadLog(config.data_dir / WAL_DIR, on_fsync=metrics.wal_fsync.observe)
    return Snapshotter(
        store,
        clock,
        config.snapshot_s,
        wal,
        on_save=metrics.snapshot.observe,
        on_tail_cut=metrics.wal_tail_cut,
        on_failure=metrics.snapshot_failed,
        on_log_loss=metrics.wal_records_lost,
    )


def _policies(config: SemanticCacheSettings) -> TenantPolicies:
    """The tenants' L1 policies: beside the snapshots when there is a data directory."""
    if config.data_dir is None:
        return TenantPolicies()
    try:
        return TenantPolicies(config.data_dir / FILE_NAME)
    except PolicyError as exc:
        raise ConfigError(f"{DATA_DIR}: {exc}") from None


def main() -> None:
    run_main(NAME, serve)
