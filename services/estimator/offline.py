"""The whole stack in one process on a virtual clock: the router's own pipeline, calling the
semantic-cache, prefix-cache and model servicers directly (``inprocess``), each built from the
same settings the stack reads (``.env`` and overrides) the way its ``app.serve`` builds it.

Differences from the live stack, all without effect on what is served or billed: no sockets or
processes; one ``ManualClock`` shared by every service and moved to each request's arrival time;
the simulator's sleeps are skipped (``SIM_TIME_SCALE`` only shapes latency); prefix-cache keeps
its warm prefixes in memory even when ``PREFIX_CACHE_REDIS_URL`` is set; no tracing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import faiss
import grpc
from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.config import ConfigError, Env
from services.common.errors import RequestError
from services.common.models import ModelTable, model_table_from_env
from services.common.tokens import Tokenizer, load_cl100k
from services.estimator.inprocess import ModelStub, PrefixStub, SemanticStub
from services.model.config import ModelSettings
from services.model.engine import SimEngine
from services.model.kv_cache import KvBlockCache
from services.model.servicer import ModelService
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.records import CommitRecords
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.servicer import PrefixCacheServicer
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from services.router.backends import Backends
from services.router.pipeline import Pipeline
from services.router.settings import RouterSettings
from services.router.validation import validate_request
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.config import SemanticCacheConfig
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from services.semantic_cache.leases import Leases
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.servicer import SemanticCacheService
from services.semantic_cache.verifier import Verifier, VerifierWeights
from services.stack.envfile import dial_address
from services.stack.table import SERVICES

# Secrets the settings require; nothing authenticates in-process.
_OFFLINE = {"CACHEMESH_INTERNAL_TOKEN": "offline", "CACHEMESH_API_KEYS_FILE": "/dev/null"}


async def _no_sleep(_: float) -> None:
    return None


@dataclass(frozen=True)
class Outcome:
    response: pb.CompleteResponse | None
    code: str  # OK or the gRPC status name


class OfflineStack:
    def __init__(
        self,
        settings: Mapping[str, str],
        clock: ManualClock,
        *,
        embedder: Embedder | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        env = Env({**_OFFLINE, **settings})
        self.clock = clock
        self.table: ModelTable = model_table_from_env(env)
        self.router = RouterSettings.from_env(env, self.table)
        tokens = tokenizer or load_cl100k()
        backends = Backends(
            semantic=cast(Any, SemanticStub(self._semantic(env, clock, embedder))),
            prefix=cast(Any, PrefixStub(self._prefix(env, clock, tokens))),
            models=dict(self.router.replicas),
            replica_stubs=self._replicas(settings, tokens),
            metadata=(),
        )
        self._pipeline = Pipeline(backends, self.table, tokens, trace.NoOpTracer(), self.router)

    def _semantic(self, env: Env, clock: ManualClock, embedder: Embedder | None) -> Any:
        config = SemanticCacheConfig.from_env(env, OperatingPoint.load())
        verifier = Verifier(VerifierWeights.load(), config.verifier_min_p)
        faiss.omp_set_num_threads(config.faiss_threads)
        model = embedder or load_minilm_embedder(threads=config.ort_threads)
        leases = Leases(clock, config.lease_s) if config.lease_wait_s > 0 else None
        cache = SemanticCache(
            model, clock, threshold=config.threshold, ttl_s=config.ttl_s,
            max_entries=config.max_entries, verifier=verifier, margin=config.ambiguity_margin,
            policy=config.policy, leases=leases,
        )  # fmt: skip
        servicer = SemanticCacheService(lease_wait_s=config.lease_wait_s)
        servicer.attach(cache)
        return servicer

    def _prefix(self, env: Env, clock: ManualClock, tokenizer: Tokenizer) -> Any:
        settings = PrefixCacheSettings.from_env(env)
        core = PrefixCacheCore(
            table=self.table,
            tokenizer=TokenizerSlot(tokenizer),
            cache=InMemoryWarmStore(settings.max_warm_entries),
            views=ReplicaViews(settings.replica_capacity_blocks),
            ledger=InMemoryLedger(
                CommitRecords(settings.record_ttl_s * 1000, settings.max_records), TotalsLedger()
            ),
            clock=clock,
            lookback=settings.lookback_blocks,
        )
        return PrefixCacheServicer(core)

    def _replicas(self, settings: Mapping[str, str], tokenizer: Tokenizer) -> dict[str, Any]:
        """One engine for each model process of the stack table, with that process's own
        settings, under the address the router dials; every replica the router names."""
        stubs: dict[str, Any] = {}
        for service in SERVICES:
            if service.package != "model":
                continue
            env = service.process_env({**_OFFLINE, **settings})
            address = dial_address(env.get("MODEL_LISTEN") or f"127.0.0.1:{service.default_port}")
            stubs[address] = ModelStub(self._replica(env, tokenizer))
        named = {a for addresses in self.router.replicas.values() for a in addresses}
        if named - set(stubs):
            raise ConfigError(
                f"MODEL_REPLICAS names {sorted(named - set(stubs))}, which no model process of "
                "the stack table listens on; the estimator can only replay the stack's replicas"
            )
        return stubs

    @staticmethod
    def _replica(env: Mapping[str, str], tokenizer: Tokenizer) -> Any:
        config = ModelSettings.from_env(env)
        engine = SimEngine(
            models=config.models,
            replica_id=config.replica_id,
            tokenizer=tokenizer,
            kv_cache=KvBlockCache(config.kv_capacity_blocks),
            time_scale=0.0,
            sleep=_no_sleep,
        )
        return ModelService(config.replica_id, engine)

    async def complete(self, tenant: str, request: pb.CompleteRequest) -> Outcome:
        """One request as the Gateway's ``Complete`` would answer it."""
        try:
            validate_request(request, self.table, set(self.router.replicas))
            end: pb.CompleteResponse | None = None
            async for chunk in self._pipeline.run(tenant, request):
                if chunk.WhichOneof("part") == "end":
                    end = chunk.end
        except RequestError as exc:
            return Outcome(None, exc.code.name)
        except grpc.aio.AioRpcError as exc:
            return Outcome(None, exc.code().name)
        if end is None:
            return Outcome(None, grpc.StatusCode.INTERNAL.name)
        return Outcome(end, "OK")
