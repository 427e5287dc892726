"""semantic-cache's metrics (L1).

- ``cachemesh_semantic_cache_lookups_total{tenant,result}``: every Lookup, ``result`` one of
  ``exact``, ``paraphrase`` (hits), ``miss``, ``pending`` (a miss while an identical request
  still holds the lease) and ``skipped`` (no read: a bypass, refresh or prefill);
  ``cachemesh_semantic_cache_hits_total{tenant,kind}`` the hits alone (``exact`` /
  ``paraphrase``); ``cachemesh_semantic_cache_refusals_total{reason}``: candidates above the
  threshold not served (``verifier``, ``ambiguous``, ``unreadable``: the questions differ in
  characters the models read as ``[UNK]``, ``too_long``: the verifier cannot read in full where
  they differ, ``symbols``: they differ in operators or signs, ``numbers``: they hold
  different numbers, ``opposite``: a word and its un- form or its opposite, ``swapped``: the
  same words on the other sides of than, to, from..., ``shape``: answers of another length,
  detail or layout asked, ``tier``: an ``auto`` hit whose answer's tier the request does not
  accept, counted a miss; ``model``: an ``auto`` hit another row made than its tiers resolve
  to now, counted a miss);
- ``cachemesh_semantic_cache_stores_total{tenant,outcome}`` (``stored`` / ``skipped``);
- ``cachemesh_semantic_cache_entries{tenant}`` and ``..._bytes{tenant}`` (the answers, questions,
  vectors and scopes' indexes held; tenants past the cap summed as ``other``);
  ``..._old_scope_entries``: of them, those stored under an older scope version
  (``query.SCOPE_VERSION``), which no lookup can reach any more after an upgrade that changed
  it (they leave at their TTL, or first when L1 is full); ``..._evictions_total``
  (capacity: the largest tenant's LRU entry), ``..._expirations_total`` (TTL) and
  ``..._invalidations_total`` (Drop) and ``..._refused_drops_total{reason}`` (answers no
  lookup is served any more: ``model``, made by a row ``auto`` no longer resolves to), read
  from the cache at each scrape;
- ``cachemesh_semantic_cache_lease_waits_total{outcome}`` (``served``: the identical request's
  answer was served; ``not_served``) and ``..._lease_wait_seconds``;
- ``cachemesh_semantic_cache_embed_batch_size`` and ``..._embed_duration_seconds`` (each
  embedder call of the micro-batcher); ``..._embed_queue`` (texts waiting for a batch),
  ``..._embed_shed_total{call}`` (texts refused at once, the queue or the tenant's part of it
  full: a ``lookup`` skips L1, a ``store`` stores nothing) and ``..._embed_dropped_total{call}``
  (texts whose caller went, past its deadline or cancelled, before their batch: never
  embedded);
- ``cachemesh_semantic_cache_wal_fsync_seconds`` and ``..._snapshot_seconds``;
  ``..._snapshot_failures_total``: saves that failed (a full disk, an I/O error), each retried
  the next period or drop; until one succeeds, what was dropped since the last saved snapshot
  is still on the disk;
  ``..._writes_refused_total{write}``: Stores, Drops (``drop``: a purge) and policy changes
  refused UNAVAILABLE because they could not be made durable (the write-ahead log failed and no
  snapshot has been saved since, a full disk under the policy file): each refused write was not
  applied (an answer not kept, a purge not done: its caller must retry);
  ``..._wal_tail_cuts_total{kind}``: a bad end cut off the write-ahead log at start, ``torn``
  (a crash mid-append, never acknowledged) or ``damaged`` (a whole record failing its
  checksum, moved aside: it may have been acknowledged; the log says where);
  ``..._wal_records_lost_total``: records found missing at start before the write-ahead log's
  first segment with no snapshot to hold them (the snapshot removed or lost: the acknowledged
  Stores and Drops only it held are gone; the log's ERROR line names them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import OTHER, LoopMetrics, TenantLabels
from services.semantic_cache.journal import MODEL
from services.semantic_cache.records import CheckResult
from services.semantic_cache.stats import StoreStats

# the embedder's callers (``batcher``'s lanes) and the ends the write-ahead log cuts at start
# (``wal.TailCut.kind``): their counters' label values
EMBED_CALLS = ("lookup", "store")
TAIL_CUT_KINDS = ("torn", "damaged")
# the writes refused when they cannot be made durable: ``..._writes_refused_total``'s label
REFUSED_WRITES = ("store", "drop", "policy")
# the reasons of ``..._refused_drops_total`` (``StoreStats.refused_drops``)
REFUSED_DROP_REASONS = frozenset({MODEL})

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class SemanticCacheMetrics:
    def __init__(self, registry: CollectorRegistry, tenants: TenantLabels) -> None:
        self._tenants = tenants
        m = LoopMetrics(registry)
        self._lookups = m.counter(
            "cachemesh_semantic_cache_lookups",
            "Lookups, by result: exact, paraphrase (hits), miss, pending, skipped",
            ("tenant", "result"),
        )
        self._hits = m.counter(
            "cachemesh_semantic_cache_hits",
            "Lookups answered from the cache, exact or paraphrase",
            ("tenant", "kind"),
        )
        self._refusals = m.counter(
            "cachemesh_semantic_cache_refusals",
            "Candidates above the threshold not served: verifier, ambiguous, unreadable, too_long, "
            "symbols, numbers, opposite, swapped, shape, tier",
            ("reason",),
        )
        self._stores = m.counter(
            "cachemesh_semantic_cache_stores",
            "Stores, stored or skipped (not cacheable)",
            ("tenant", "outcome"),
        )
        self._lease_waits = m.counter(
            "cachemesh_semantic_cache_lease_waits",
            "Lookups that waited for an identical request's model call (single flight)",
            ("outcome",),
        )
        self._lease_wait = m.histogram(
            "cachemesh_semantic_cache_lease_wait_seconds",
            "How long a lookup waited on an identical request's lease",
        )()
        self._embed_batch = m.histogram(
            "cachemesh_semantic_cache_embed_batch_size",
            "Texts embedded by one embedder call (micro-batching)",
            buckets=BATCH_BUCKETS,
        )()
        self._embed_duration = m.histogram(
            "cachemesh_semantic_cache_embed_duration_seconds", "One embedder call (a batch)"
        )()
        self._embed_queue = m.gauge(
            "cachemesh_semantic_cache_embed_queue", "Texts waiting for an embedding batch"
        )()
        self._embed_shed = m.counter(
            "cachemesh_semantic_cache_embed_shed",
            "Texts refused at once, the embedding queue (or the tenant's part) full: L1 busy",
            ("call",),
        )
        self._embed_dropped = m.counter(
            "cachemesh_semantic_cache_embed_dropped",
            "Queued texts not embedded: their caller went (deadline passed, cancelled)",
            ("call",),
        )
        self.wal_fsync = m.histogram(
            "cachemesh_semantic_cache_wal_fsync_seconds",
            "One fsync of the write-ahead log (a group commit)",
        )()
        self.snapshot = m.histogram(
            "cachemesh_semantic_cache_snapshot_seconds",
            "One snapshot save: the copy, the write and the fsyncs",
        )()
        self._snapshot_failures = m.counter(
            "cachemesh_semantic_cache_snapshot_failures",
            "Snapshot saves that failed (a full disk, an I/O error): retried the next period or "
            "drop; until one succeeds what was dropped since the last saved one is on the disk",
        )()  # unlabelled: at 0 from the start
        self._writes_refused = m.counter(
            "cachemesh_semantic_cache_writes_refused",
            "Stores, Drops and policy changes refused because they could not be made durable "
            "(a failed write-ahead log, a full disk): not applied",
            ("write",),
        )
        self._wal_tail_cuts = m.counter(
            "cachemesh_semantic_cache_wal_tail_cuts",
            "Bad ends cut off the write-ahead log at start: torn (a crash mid-append) or "
            "damaged (a whole record failing its checksum, moved aside)",
            ("kind",),
        )
        self._wal_records_lost = m.counter(
            "cachemesh_semantic_cache_wal_records_lost",
            "Write-ahead-log records found missing at start, held by no snapshot (removed or "
            "lost): acknowledged Stores and Drops lost",
        )()  # unlabelled: at 0 from the start
        # each at 0 from the start, so rate() and increase() see a first event (a series that
        # first shows at 1 is not a step for them), as the dashboard's panels and the alerts
        # read them
        for call in EMBED_CALLS:
            self._embed_shed(call)
            self._embed_dropped(call)
        for kind in TAIL_CUT_KINDS:
            self._wal_tail_cuts(kind)
        for write in REFUSED_WRITES:
            self._writes_refused(write)

    def looked_up(self, tenant: str, result: CheckResult) -> None:
        label = self._tenants(tenant)
        if result.hit:
            kind = "exact" if result.exact else "paraphrase"
            self._lookups(label, kind).inc()
            self._hits(label, kind).inc()
        elif result.skip_reason:
            self._lookups(label, "skipped").inc()
        else:
            self._lookups(label, "pending" if result.pending else "miss").inc()
        if result.refusal:
            self._refusals(refusal_reason(result.refusal)).inc()

    def stored(self, tenant: str, stored: bool) -> None:
        self._stores(self._tenants(tenant), "stored" if stored else "skipped").inc()

    def lease_waited(self, seconds: float, served: bool) -> None:
        self._lease_waits("served" if served else "not_served").inc()
        self._lease_wait.observe(seconds)

    def embedded(self, texts: int, seconds: float) -> None:
        self._embed_batch.observe(texts)
        self._embed_duration.observe(seconds)

    def embed_queue(self, texts: int) -> None:
        self._embed_queue.set(texts)

    def embed_shed(self, call: str) -> None:
        self._embed_shed(call).inc()

    def embed_dropped(self, call: str) -> None:
        self._embed_dropped(call).inc()

    def snapshot_failed(self) -> None:
        self._snapshot_failures.inc()

    def write_refused(self, write: str) -> None:
        """A ``write`` (one of ``REFUSED_WRITES``) was refused: it could not be made durable."""
        self._writes_refused(write).inc()

    def wal_tail_cut(self, kind: str) -> None:
        self._wal_tail_cuts(kind).inc()

    def wal_records_lost(self, records: int) -> None:
        self._wal_records_lost.inc(records)


def refusal_reason(refusal: str) -> str:
    """The closed set of refusal labels (the refusal itself is a sentence, on the span)."""
    if refusal.startswith("the verifier"):
        return "verifier"
    for prefix, label in _REFUSAL_LABELS:
        if refusal.startswith(prefix):
            return label
    return "other"


_REFUSAL_LABELS = (
    ("ambiguous:", "ambiguous"),
    ("unreadable:", "unreadable"),  # reading.UNREADABLE
    ("too long:", "too_long"),  # reading.TOO_LONG
    ("symbols:", "symbols"),  # reading.SYMBOLS
    ("numbers:", "numbers"),  # reading.NUMBERS
    ("opposite:", "opposite"),  # reading.OPPOSITE, reading.ANTONYMS
    ("swapped:", "swapped"),  # reading.SWAPPED
    ("shape:", "shape"),  # reading.SHAPE
    ("tier:", "tier"),  # api: an auto hit of a tier the request does not accept
    ("model:", "model"),  # api: an auto hit of a row its tiers no longer resolve to
)


class StoreCollector(Collector):
    """The cache's sizes and removals, read from its ``StoreStats`` at each scrape (on the
    event loop, as the cache writes them)."""

    def __init__(self, stats: StoreStats, max_tenants: int) -> None:
        self._stats = stats
        self._max_tenants = max_tenants

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        entries, sizes = stats.entries, stats.bytes
        kept = set(sorted(entries, key=lambda t: -entries[t])[: self._max_tenants])
        by_label: dict[str, list[int]] = {}
        for tenant, count in entries.items():
            label = tenant if tenant in kept else OTHER
            pair = by_label.setdefault(label, [0, 0])
            pair[0] += count
            pair[1] += sizes.get(tenant, 0)
        held = GaugeMetricFamily(
            "cachemesh_semantic_cache_entries", "Entries held, by tenant", labels=["tenant"]
        )
        size = GaugeMetricFamily(
            "cachemesh_semantic_cache_bytes",
            "Bytes held (answers, normalised questions, vectors, scopes' indexes), by tenant",
            labels=["tenant"],
        )
        for label, (count, nbytes) in sorted(by_label.items()):
            held.add_metric([label], count)
            size.add_metric([label], nbytes)
        yield held
        yield size
        yield GaugeMetricFamily(
            "cachemesh_semantic_cache_old_scope_entries",
            "Entries held of an older scope version: counted in entries, never served (TTL or "
            "evicted first)",
            value=stats.old_scope,
        )
        yield CounterMetricFamily(
            "cachemesh_semantic_cache_evictions",
            "Entries evicted over capacity (the LRU one of the tenant holding the most)",
            value=stats.evictions,
        )
        yield CounterMetricFamily(
            "cachemesh_semantic_cache_expirations",
            "Entries removed at their TTL",
            value=stats.expirations,
        )
        yield CounterMetricFamily(
            "cachemesh_semantic_cache_invalidations",
            "Entries removed by Drop (an entry, a namespace or a tenant)",
            value=stats.invalidations,
        )
        refused = CounterMetricFamily(
            "cachemesh_semantic_cache_refused_drops",
            "Entries dropped as no lookup of their scope is served them any more, by reason "
            "(model: made by a row the scope's model no longer resolves to, auto repointed)",
            labels=["reason"],
        )
        # each known reason at 0 from the start (as the labelled counters above)
        for reason in sorted(REFUSED_DROP_REASONS | stats.refused_drops.keys()):
            refused.add_metric([reason], stats.refused_drops.get(reason, 0))
        yield refused
