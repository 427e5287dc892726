"""The whole stack in one process on a virtual clock: the router's own pipeline over its
dependency protocols, answered by the semantic-cache, prefix-cache and model APIs
(``local_adapters``), each built by the same wiring function its ``serve()`` uses, from the
settings the stack reads (``.env`` and overrides).

Differences from the live stack: no sockets or processes; one ``ManualClock`` shared by every
service (and the router's replica choice), moved by the replay (``replay.py``) to each
request's arrival and to each logged first token and end; the simulator answers at once (its
sleeps are skipped; ``SIM_TIME_SCALE`` only shapes latency) and the offline model adapter holds
its answer until the logged times, so requests that overlapped live overlap here, and a lease
wait, and the leader's renewals of its lease, run on the virtual clock; prefix-cache keeps its
warm prefixes in memory even when ``PREFIX_CACHE_REDIS_URL`` is set; the tenants' limits and
budgets (``ROUTER_LIMIT_*``, ``ROUTER_BUDGET_*``, built by the router's ``limit_wiring``) count
on the virtual clock in this process even when ``ROUTER_LIMITS_REDIS_URL`` is set, from nothing
used (what another run or router had spent of a budget on the live stack is not known here),
the log taken to start at a UTC midnight (``REPLAY_START_MS``: the log does not say when it
was); no tracing.

What these change in what is served or billed: nothing for a log of one request at a time. For
overlapping requests, the times a request's WARM commit (its prefix becomes readable) and its
Store (its L1 entry) happen are estimated: the prefill ends at the logged first token less its
first delta's decode (a streamed run) or the logged end less the answer's decode time at the
replica's ``SIM_TIME_SCALE`` (the README's 500-request mix: the same ``served_by`` counts as
live; cost 2.3%, 2.5%, 1.3% above it at 8, 16, 32 in flight, 0.05%, 0.00%, 2.1% streamed: the
live time after the decode that a log without ``ttft_ms`` does not hold); the Store is at the
logged end; a lookup waiting on an identical request's lease
waits on the virtual clock, up to the same budgets as live; a request that reaches the model
only in a what-if (an L1 hit live, so no logged model time) ends at its logged end all the same;
the simulator's KV cache takes a prompt's blocks at its arrival, not at its first token (a
``self_hosted`` model's reuse can then be read by a request arriving during that prefill); a
log without ends (older logs, ``--workload``) is replayed one request at a time, as if each
answer took no time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial

import faiss
from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.errors import Code, RequestError
from services.common.model_overrides import model_table_from_env
from services.common.models import ModelTable
from services.common.tokens import Tokenizer, Tokenizers, load_tokenizers
from services.model.api import ModelApi
from services.model.settings import ModelSettings
from services.model.wiring import build_engine
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.core import TokenizerSlot
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.wiring import build_core
from services.router.dependencies import CallFailed, Dependencies
from services.router.limit_denials import Denial
from services.router.limit_tickets import ModelUse
from services.router.limit_wiring import limiter_on
from services.router.memory_limits import MemoryLimitStore
from services.router.pipeline import Pipeline
from services.router.prompt_counts import counting
from services.router.routing.model import RouterCard, load_router_model
from services.router.settings import RouterSettings
from services.router.validation import validate_request
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.cross_encoder import PairScorer
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.wiring import build_api, build_cache, build_verifier
from services.tools.estimator.local_adapters import (
    LocalModels,
    LocalPrefix,
    LocalSemantic,
    replay_sleep,
)
from services.tools.stack.environment import dial_address
from services.tools.stack.service_table import SERVICES

# Where a replay's virtual clock starts: a log's times are relative (``t_ms`` from its start;
# no line says when it was), so the log is taken to start at 00:00 UTC on the 1st of a month:
# a daily budget renews every 24 h of the log and a monthly one 31 days in, not where the live
# run's midnight fell (the estimate says so). 2024-01-01T00:00:00Z.
REPLAY_START_MS = 1_704_067_200_000

# Secrets the settings require (the token as long as every service's start-up check asks);
# nothing authenticates in-process.
_OFFLINE = {
    "CACHEMESH_INTERNAL_TOKEN": "offline-estimator-in-process",
    "CACHEMESH_API_KEYS_FILE": "/dev/null",
}


async def _no_sleep(_: float) -> None:
    return None


@dataclass(frozen=True)
class Outcome:
    response: pb.CompleteResponse | None
    code: str  # OK or the status name


class OfflineStack:
    def __init__(
        self,
        settings: Mapping[str, str],
        clock: ManualClock,
        *,
        embedder: Embedder | None = None,
        tokenizer: Tokenizer | None = None,
        semantic_metrics: SemanticCacheMetrics | None = None,
        cross_encoder: PairScorer | None = None,
    ) -> None:
        """``semantic_metrics``: L1's counts of the replay (None: none kept);
        ``embedder``, ``tokenizer``, ``cross_encoder`` (L1's verifier's): loaded here when
        None (a caller that builds many stacks loads each once and hands it in)."""
        env = Env({**_OFFLINE, **settings})
        self.clock = clock
        self.table: ModelTable = model_table_from_env(env)
        self.router = RouterSettings.from_env(env, self.table)
        # each row's tokenizer: every vocabulary the table names, each loaded once (a given
        # one: the only vocabulary, its rows' all)
        tokens = (
            Tokenizers.of(tokenizer)
            if tokenizer is not None
            else load_tokenizers(self.table.models.values())
        )
        semantic = SemanticCacheSettings.from_env(env, OperatingPoint.load())
        self.semantic_cache = self._semantic(semantic, clock, embedder, cross_encoder)
        prefix = build_core(
            PrefixCacheSettings.from_env(env), self.table, TokenizerSlot(tokens), clock
        )
        apis, scales = self._replicas(settings, tokens)
        self.semantic_api = build_api(semantic, self.semantic_cache, metrics=semantic_metrics)
        dependencies = Dependencies(
            semantic=LocalSemantic(self.semantic_api, semantic.lease_wait_s),
            prefix=LocalPrefix(PrefixCacheApi(prefix)),
            model=LocalModels(apis, self.table, scales),
            models=dict(self.router.replicas),
        )
        # the Gateway's limits, admitted and settled around the pipeline as its Complete does
        self._limiter = limiter_on(
            MemoryLimitStore(), self.router.limits, clock, self.table, tokens
        )
        card = RouterCard.load()
        # as the router: ROUTER_THRESHOLD, else the card's calibrated one (not calibrated:
        # refused, as the router refuses to start)
        threshold = card.threshold(self.router.routing_threshold)
        self._pipeline = Pipeline(
            dependencies,
            self.table,
            tokens,
            trace.NoOpTracer(),
            self.router,
            (
                load_router_model(card=card),
                threshold,
                None,
            ),
            clock=lambda: clock.now_ms() / 1000,  # the replica choice's, on the virtual clock
            # a replica answers at its logged time here, while a stall's hand-over would time
            # it in real seconds (a replay parks a start for longer than its prediction)
            hand_over_stalls=False,
            # a leader's lease renewals, on the virtual clock its lease ages on
            sleep=replay_sleep,
            wall=clock,  # a WARM without a Plan: its arrival on prefix-cache's virtual clock
            # the replay takes each chunk as it comes: no slow caller to read ahead of
            read_ahead=False,
        )

    @staticmethod
    def _semantic(
        config: SemanticCacheSettings,
        clock: ManualClock,
        embedder: Embedder | None,
        cross_encoder: PairScorer | None,
    ) -> SemanticCache:
        faiss.omp_set_num_threads(config.faiss_threads)
        model = embedder or load_minilm_embedder(threads=config.ort_threads)
        verifier = build_verifier(config, model, cross_encoder)
        # leases on virtual time
        return build_cache(config, model, clock, verifier=verifier, lease_clock=clock)

    def _replicas(
        self, settings: Mapping[str, str], tokenizer: Tokenizers
    ) -> tuple[dict[str, ModelApi], dict[str, float]]:
        """One engine for each model process of the stack table, with that process's own
        settings, under the address the router dials; every replica the router names. Also
        each replica's ``SIM_TIME_SCALE`` (its engine here answers at once)."""
        apis: dict[str, ModelApi] = {}
        scales: dict[str, float] = {}
        for service in SERVICES:
            if service.package != "model":
                continue
            env = service.process_env({**_OFFLINE, **settings})
            address = dial_address(env.get("MODEL_LISTEN") or f"127.0.0.1:{service.default_port}")
            config = ModelSettings.from_env(env)
            scales[address] = config.time_scale
            config = replace(config, time_scale=0.0)
            engine = build_engine(config, tokenizer, sleep=_no_sleep)
            apis[address] = ModelApi(engine, offload=False)
        named = {a for addresses in self.router.replicas.values() for a in addresses}
        if named - set(apis):
            raise ConfigError(
                f"MODEL_REPLICAS names {sorted(named - set(apis))}, which no model process of "
                "the stack table listens on; the estimator can only replay the stack's replicas"
            )
        return apis, scales

    async def settled(self) -> None:
        """Waits for the background work of the requests served so far: their Stores and the
        bills of calls cut early, and those bills' counts against the limits."""
        await self._pipeline.drain()
        await self._limiter.drain()

    async def complete(self, tenant: str, request: pb.CompleteRequest) -> Outcome:
        """One request as the Gateway's ``Complete`` would answer it: validated, admitted by
        the tenant's limits (a refusal is ``RESOURCE_EXHAUSTED``), served, and its end counted
        by the Gateway's rule (``Limiter.finish``): one that ends before its model call was
        sent (cut while it waited on an identical request's call), or whose every model call
        its replica refused before its start, gives its reservation back."""
        end: pb.CompleteResponse | None = None
        use = ModelUse()  # its model calls sent and refused, and its answer once billed
        try:
            validate_request(request, self.table, set(self.router.replicas))
            counting(request)
            admitted = await self._limiter.admit(tenant, request)
            if isinstance(admitted, Denial):
                return Outcome(None, Code.RESOURCE_EXHAUSTED.name)
            try:
                charge = partial(self._limiter.charge, admitted)
                run = self._pipeline.run(
                    tenant,
                    request,
                    streamed=False,
                    charge=charge,
                    answer_billed=use.answer_billed,
                    model_sent=use.model_sent,
                    model_refused=use.model_refused,
                )
                async for chunk in run:  # as Complete
                    if chunk.WhichOneof("part") == "end":
                        end = chunk.end
                # Live, a request's Store reaches semantic-cache before the next request's
                # Lookup (which waits for it); replayed in one process, the next request waits
                # for it here, and for its count against the limits.
                await self._pipeline.drain()
            finally:
                self._limiter.finish(admitted, end, use)
                await self._limiter.drain()
        except RequestError as exc:
            return Outcome(None, exc.code.name)
        except CallFailed as exc:
            return Outcome(None, exc.code.name)
        if end is None:
            return Outcome(None, Code.INTERNAL.name)
        return Outcome(end, "OK")
