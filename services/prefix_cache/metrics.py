"""prefix-cache's metrics (L2): what the bills hold, by model (a row of the table).

Counted once per billed request, when its FINAL commit is first recorded (a retried FINAL
returns the same bill and counts nothing):

- ``cachemesh_prefix_cache_tokens_total{model,kind}``: ``written`` (cache writes, 5-minute and
  1-hour), ``read`` (cache reads), ``uncached`` (input at the base price), ``output``;
- ``cachemesh_prefix_cache_bills_total{model,reconciled}`` and
  ``cachemesh_prefix_cache_cost_nanos_total{model}``: the bills and their amount;
- reconciliation (a provider's reported usage against prefix-cache's estimate):
  ``cachemesh_prefix_cache_drift_abs_prompt_tokens_total{model}`` and
  ``cachemesh_prefix_cache_drift_abs_cost_nanos_total{model}``, the absolute differences
  summed over the reconciled bills (divide by ``bills_total{reconciled="true"}``);
- ``cachemesh_prefix_cache_kv_unattributed_tokens_total{model}``: a self-hosted engine's
  KV reuse beyond what the tenant's own traffic accounts for (its view's prediction), so not
  billed as a read: other tenants' identical prefixes on the shared engine, and the view's
  misses (the engine's tokenizer counts more, the previous answer it kept; no tenant named);
- ``cachemesh_prefix_cache_plans_total{model}``; ``cachemesh_prefix_cache_warm_prefixes``:
  the warm prefixes held in memory, refreshed every ``WARM_REFRESH_S``. With the Redis store
  the gauge is absent: counting keys there is a SCAN of the keyspace (seconds of this
  process's CPU at 300k keys, on every refresh); Redis's own ``INFO keyspace`` gives the count
  when its database is dedicated to the warm prefixes;
- ``cachemesh_prefix_cache_view_corrections_total{model,cause}`` and
  ``cachemesh_prefix_cache_view_evicted_blocks_total{model,cause}``: the replica view's
  corrections (``ReplicaViews``) and the blocks they evicted: ``report``, a self-hosted
  engine's report of less reuse than predicted (the blocks touched no later go), ``stall``, a
  call handed over as stalled from a replica predicted warm (``stalled_warm_replicas``: that
  prompt's blocks from the first a lost prefix must have taken on go). Many ``stall``
  corrections on one model: a restarted or overloaded engine; ``restart``, a WARM from a new
  run of a replica's engine (``CommitRequest.replica_instance``): the replica's whole view
  forgotten, every tenant's blocks (each count one wipe);
- ``cachemesh_prefix_cache_redis_pool_exhausted_total``: calls refused UNAVAILABLE because
  none of the process's Redis connections (PREFIX_CACHE_REDIS_MAX_CONNECTIONS) came free in
  time. Redis may be answering: the service's health (a PING over a connection of its own)
  stays SERVING, so a saturated pool shows here, not as NOT_SERVING;
- ``cachemesh_prefix_cache_redis_store_resets_total``: losses of prefix-cache's Redis data
  seen while it ran (``redis_health.STORE_KEY`` gone: every tenant's totals restarted from
  zero, commit records lost; or ``redis_health.SEQ_KEY`` gone back: the writes since an older
  snapshot lost).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.common.metrics import LoopCounter, LoopMetrics
from services.prefix_cache.commit_records import Final

WARM_REFRESH_S = 10.0  # how often the warm-prefix gauge counts them (in memory: O(1))


class PrefixCacheMetrics:
    def __init__(self, registry: CollectorRegistry, *, warm_gauge: bool = True) -> None:
        """``warm_gauge``: export the warm-prefix gauge (False with the Redis store)."""
        m = LoopMetrics(registry)
        self._tokens = m.counter(
            "cachemesh_prefix_cache_tokens",
            "Prompt and output tokens billed: written, read, uncached, output",
            ("model", "kind"),
        )
        self._bills = m.counter(
            "cachemesh_prefix_cache_bills",
            "Requests billed (FINAL commits), reconciled with a provider's report or not",
            ("model", "reconciled"),
        )
        self._cost = m.counter(
            "cachemesh_prefix_cache_cost_nanos",
            "What the bills charged, in nano-dollars",
            ("model",),
        )
        self._drift_tokens = m.counter(
            "cachemesh_prefix_cache_drift_abs_prompt_tokens",
            "|reported - estimated| prompt tokens, summed over the reconciled bills",
            ("model",),
        )
        self._drift_cost = m.counter(
            "cachemesh_prefix_cache_drift_abs_cost_nanos",
            "|reported - estimated| cost in nano-dollars, summed over the reconciled bills",
            ("model",),
        )
        self._unattributed = m.counter(
            "cachemesh_prefix_cache_kv_unattributed_tokens",
            "Self-hosted engine KV reuse not billed as a read: beyond the tenant's own traffic",
            ("model",),
        )
        self._plans = m.counter(
            "cachemesh_prefix_cache_plans",
            "Plans computed (a miss's split and replica candidates)",
            ("model",),
        )
        self._view_corrections = m.counter(
            "cachemesh_prefix_cache_view_corrections",
            "Replica view corrections: an engine's report below the prediction, a stall, a restart",
            ("model", "cause"),
        )
        self._view_evicted = m.counter(
            "cachemesh_prefix_cache_view_evicted_blocks",
            "Replica view blocks evicted by its corrections (report, stall, restart)",
            ("model", "cause"),
        )
        self._pool_exhausted = m.counter(
            "cachemesh_prefix_cache_redis_pool_exhausted",
            "Calls refused UNAVAILABLE: no Redis connection of the pool came free in time",
        )()
        self._store_resets = m.counter(
            "cachemesh_prefix_cache_redis_store_resets",
            "Losses of prefix-cache's Redis data (totals and commit records) seen while it ran",
        )()
        self.warm_prefixes: LoopCounter | None = None
        if warm_gauge:
            self.warm_prefixes = m.gauge(
                "cachemesh_prefix_cache_warm_prefixes",
                "Warm prefixes held in memory (expired ones not yet collected included)",
            )()

    def redis_pool_exhausted(self) -> None:
        self._pool_exhausted.inc()

    def redis_store_reset(self) -> None:
        self._store_resets.inc()

    def planned(self, model: str) -> None:
        self._plans(model).inc()

    def view_corrected(self, model: str, cause: str, corrections: int, blocks: int) -> None:
        """``corrections`` of the replica view (``cause``: ``report``, ``stall`` or
        ``restart``) evicted ``blocks``."""
        if corrections:
            self._view_corrections(model, cause).inc(corrections)
            self._view_evicted(model, cause).inc(blocks)

    def unattributed_kv(self, model: str, tokens: int) -> None:
        self._unattributed(model).inc(tokens)

    def billed(self, model: str, final: Final) -> None:
        split = final.split
        self._tokens(model, "written").inc(split.creation_tokens)
        self._tokens(model, "read").inc(split.read_tokens)
        self._tokens(model, "uncached").inc(split.input_tokens)
        self._tokens(model, "output").inc(final.output_tokens)
        self._bills(model, "true" if final.reconciled else "false").inc()
        self._cost(model).inc(final.charge.cost_nanos)
        if final.reconciled:
            drift = split.prompt_tokens - final.estimate.prompt_tokens
            self._drift_tokens(model).inc(abs(drift))
            cost_drift = final.charge.cost_nanos - final.estimate_charge.cost_nanos
            self._drift_cost(model).inc(abs(cost_drift))
