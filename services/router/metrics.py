"""The router's metrics: requests, latency, money, errors, degradations, decisions, GenAI.

Names and labels (every label set bounded: tenants capped by ``TenantLabels``, models from the
table, tiers, layers, gRPC status names, and reasons from closed sets):

- ``cachemesh_router_requests_total{tenant,model,tier,served_by}``: answered requests (a retry
  answered from the answer-once table is ``cachemesh_router_replays_total{tenant}`` instead:
  it is neither served nor billed again);
- ``cachemesh_router_errors_total{tenant,code,deadline}``: refused or failed requests by gRPC
  status (``tenant="_none"`` before a key was recognised, as a request that did not parse:
  ``INVALID_ARGUMENT``; one over ``ROUTER_MAX_REQUEST_BYTES`` is its tenant's
  ``RESOURCE_EXHAUSTED``, unless over twice it, which gRPC refuses itself);
  ``deadline`` only on DEADLINE_EXCEEDED: ``router`` when the router's own
  ``ROUTER_MODEL_TIMEOUT_S`` cut a model call still answering (the server's fault, alerted on),
  ``client`` when the caller's deadline did;
- ``cachemesh_router_request_duration_seconds{served_by}`` (``error`` for failures),
  ``cachemesh_router_ttft_seconds{tier}`` (a model call's first token),
  ``cachemesh_router_dependency_duration_seconds{method,code}`` (each call to semantic-cache,
  prefix-cache and the models; Generate until its stream ends);
- ``cachemesh_router_cost_nanos_total`` and ``cachemesh_router_baseline_nanos_total``
  ``{tenant,served_by}``: what the answers cost and would have cost with no cache, in
  nano-dollars, as the responses reported; ``cachemesh_router_saved_nanos{tenant,served_by}``
  is their difference, a gauge because a turn that pays a cache write saves a negative amount
  (rate it as baseline minus cost). An answer billed in full whose caller left before it
  reached it (its deadline, a cancel while the answer was recorded or sent) counts under the
  layer that served it, as its access-log line says, and in ``errors_total``, not
  ``requests_total``. ``served_by="unanswered"``: model calls billed without an
  answer (the caller cancelled, or the replica was cut, also before another one answered), as
  prefix-cache billed them (or the estimate at base prices when the bill went to the outbox);
  they are in no ``requests_total``. A bill the billing outbox kept (prefix-cache down or
  failing; not a caller's short deadline: its bill is made after it left, under the router's
  own limits) counts at that estimate, and once its replay is billed
  ``cachemesh_router_cost_corrections_nanos_total{tenant,direction}`` counts the bill minus
  the estimate, ``up`` or ``down`` by its sign (a counter never decreases; a killed router's
  call billed from its journal, which no cost counter counted, ``up`` by its whole bill). The
  cost counters plus ``up`` minus ``down`` are what the requests were billed (the baseline,
  saved and token counters keep the estimate's; a bill prefix-cache refused for good keeps
  its estimate, as the budgets do);
- ``cachemesh_router_tokens_total{tenant,served_by,type}``: the responses' usage (``input``,
  ``cache_creation``, ``cache_read``, ``output``), and the unanswered calls' bills';
- ``cachemesh_router_degraded_total{dependency,reason}``: calls that failed and degraded the
  request (reason: the gRPC status; ``limits``: its store failed, DEADLINE_EXCEEDED when it
  did not answer in time or was not called, its Redis left alone after failures in a row,
  else UNAVAILABLE, and the request was admitted with no limit;
  ``prefix-cache``: a call not made after timeouts, ``calls.PrefixWindow``, counts as
  DEADLINE_EXCEEDED; ``semantic-cache``: a Lookup, or a Store without a lease, not made while
  ``ROUTER_SEMANTIC_BREAKER_S`` leaves L1 alone, too; ``client_deadline``, no status: a
  prefix-cache call or a Lookup the request's own deadline cut short, given under half of
  the router's limit for it, or left no time for, no fault of the dependency and left out
  of its alert; not a FINAL prefix-cache refused ``FAILED_PRECONDITION`` for want of its WARM,
  which it lost, or of a model its replica's table lacks (the WARM's, or ``baseline_model``):
  ``calls.Calls._warm_lost``, in ``dependency_duration_seconds`` alone, its bill kept by the
  billing outbox until a replica with the model takes it);
  ``cachemesh_router_decisions_total{tier,reason}``: the
  tier each model call went to and why (``requested``, ``threshold``, ``cost_aware``: the
  prefix cache's costs moved the threshold or band edges, ``fallback``);
  ``cachemesh_router_requests_in_flight``;
  ``cachemesh_router_replica_ejections_total{model}``: replicas left out for a cool-off after
  failing calls in a row (``replica_health``; a re-ejection after a failed probe counts too);
  ``cachemesh_router_outbox_refused_total``: requests refused before their model call because
  the billing outbox in memory was over ``ROUTER_OUTBOX_MAX_BYTES`` (prefix-cache down long),
  or its journal could not write (a full disk) while prefix-cache took no bill;
  ``cachemesh_router_outbox_pending``: the bills the billing outbox keeps now (prefix-cache
  down or failing, or no replica's model table has their model: ``TableLacksModel``, kept for
  ever until one has), read at each scrape, and
  ``cachemesh_router_outbox_oldest_age_seconds``: how long ago the oldest of them was first kept
  (the wall clock's: a step back of it reads low, or 0, until it catches up; 0 when none; one an
  earlier process journalled counts from this process's start; an entry whose "done" did not run is
  pending, with its keep time, until a round does it again; the lines of a newer router's journal
  version, kept in the file unread, are in neither): alert on it over a bound (prefix-cache back,
  replays should empty it within ``ROUTER_OUTBOX_RETRY_S``s; one that keeps growing is a bill no
  replica takes);
  ``cachemesh_router_open_calls_settled_total``: model calls whose FINAL the router never
  made (it was killed mid-call, or their bill failed) billed from its journal's open calls at
  prefix-cache's estimate (a call whose FINAL had landed before the kill is counted, and
  billed once);
  ``cachemesh_router_outbox_dropped_total``: billing-outbox entries prefix-cache refused for
  good, their bills never made (an open call of a killed router whose Plan prefix-cache no
  longer holds: restarted with its state in memory, another replica, or past its plan TTL),
  and bills held in memory (an outbox without a journal, or bills the journal could not
  write) lost as the router stopped;
  ``cachemesh_router_journal_sync_failures_total``: syncs and writes of the billing outbox's
  journal that failed (a failed fsync stays so until the journal is rewritten into a fresh
  file; a write fails on a full disk: meanwhile an answer whose bill must be kept is refused),
  and its file found removed or replaced while the router ran (rewritten then);
  ``cachemesh_router_limits_settles_lost_total``: requests' costs and tokens never counted
  against the limits (their settle failed and was dropped: the queue of pending ones full,
  past its replay window, an ambiguous try past ``AMBIGUOUS_REPLAY_MS``, or the router
  stopping);
  ``cachemesh_router_limits_store_resets_total``: losses of the limits' Redis counts this
  router found (its store's id gone or replaced: a Redis restarted without persistence,
  failed over, flushed), after which every tenant's limits count from zero;
  ``cachemesh_router_answer_ledger_failures_total{operation}``: calls to the answer ledger's
  Redis that failed or did not answer in time (``claim``, ``renew``: each failed try of a
  claim's renewal, ``record``, ``give_back``), or were not made while that Redis was left
  alone (``ROUTER_REDIS_BREAKER_S``); each costs a request only its answer-once protection
  across routers (a retry on another router may be served and billed again);
  ``cachemesh_router_redis_breaker_opens_total{client}``: times a Redis client of the router
  (``limits``, ``answer_ledger``) stopped calling its Redis for ``ROUTER_REDIS_BREAKER_S``
  after 3 calls in a row failed or timed out (again each time a call tried after that failed);
  the calls not made count as the failures above (``limits``: degraded, DEADLINE_EXCEEDED);
  ``cachemesh_router_breaker_opens_total{dependency}``: hangs of ``prefix-cache`` and
  ``semantic-cache`` (its Lookups): times 3 calls in a row timed out and the router stopped
  calling it (``ROUTER_PREFIX_BREAKER_S``, ``ROUTER_SEMANTIC_BREAKER_S``), once a hang, not
  again at each trial that times out meanwhile (a family of its own: the Redis one's name and
  ``client`` label are Redis's, and it counts those re-opens too); the calls not made count
  as ``degraded_total`` DEADLINE_EXCEEDED; one tenant's Lookups timing out while other
  tenants' are answered (its own backlog) leave L1 alone for that tenant alone, not counted
  here (no hang; its WARNING line names the tenant) but in
  ``cachemesh_router_l1_tenant_breaker_opens_total``: times L1 was left alone for one tenant
  (once a run of its timeouts, not at each failed trial; no tenant label, tenant names being
  unbounded: the WARNING line names it);
  ``cachemesh_router_admin_auth_failures_total{reason}``: Admin API calls refused
  UNAUTHENTICATED for their credential (``missing``: no bearer token, ``wrong``, ``ambiguous``:
  more than one authorization header), each reason at 0 from the start; a brute force shows
  here, and in a WARNING line (the caller's address and the method, never the token) at most
  once every 10 s a reason and caller's host (``admin_auth.AuthFailures``);
- OpenTelemetry's GenAI client metrics on the model calls (the ``chat <model>`` spans):
  ``gen_ai_client_token_usage{gen_ai_operation_name,gen_ai_provider_name,
  gen_ai_request_model,gen_ai_response_model,gen_ai_token_type}`` (input = the whole prompt,
  cached tokens included, as the conventions define it) and
  ``gen_ai_client_operation_duration_seconds{...,error_type}``, with the conventions' buckets;
  a call billed without its answer (cancelled, cut) is observed once its bill is known, with
  the billed tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachemesh.v1 import gateway_pb2 as pb
from services.common.metrics import NONE, LoopCounter, LoopHistogram, LoopMetrics, TenantLabels
from services.common.models import ModelSpec
from services.router.admin_auth import REASONS as ADMIN_AUTH_REASONS
from services.router.admin_auth import Reason as AdminAuthReason
from services.router.answer_ledger import LEDGER_OPERATIONS, LedgerOperation
from services.router.breaker import DEPENDENCIES, REDIS_CLIENTS, Dependency, RedisClient
from services.router.dependencies import CLIENT_DEADLINE as CUT_BY_CLIENT
from services.router.outbox import Backlog
from services.router.routing.decision import Decision

LAYERS = {
    pb.LAYER_UNSPECIFIED: "none",
    pb.LAYER_SEMANTIC_CACHE: "semantic_cache",
    pb.LAYER_PREFIX_CACHE: "prefix_cache",
    pb.LAYER_MODEL: "model",
}
ERROR_LAYER = "error"
# the layers an answer is served by (``known`` creates them at 0 for each tenant and model)
SERVED_LAYERS = ("semantic_cache", "prefix_cache", "model")
# the statuses a tenant's Gateway calls end with, created at 0 (``known``): the server's
# faults alerts.yml counts, and the callers' own the dashboard shows
TENANT_CODES = (
    "UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED", "DEADLINE_EXCEEDED",
    "CANCELLED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
)  # fmt: skip
# ``cachemesh_router_degraded_total``'s dependency for the limits store, and the reasons a
# degraded call counts under (UNAVAILABLE: it failed or refused; DEADLINE_EXCEEDED: too slow,
# or not called while its breaker is open)
LIMITS = "limits"
DEGRADED_REASONS = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
# ``cachemesh_router_errors_total{code="DEADLINE_EXCEEDED"}``'s ``deadline``: whose it was
ROUTER_DEADLINE = "router"
CLIENT_DEADLINE = "client"
# the money of model calls billed without an answer (cancelled, or cut before a retry)
UNANSWERED = "unanswered"
# ``cachemesh_router_cost_corrections_nanos_total``'s directions: billed more, or less, than
# the cost counters counted
UP = "up"
DOWN = "down"
# the GenAI semantic conventions' explicit bucket boundaries
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67,108,864
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_GEN_AI = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
)


@dataclass(frozen=True)
class _Answered:
    """The children one (tenant, model, tier, layer) writes on every answer."""

    requests: LoopCounter
    cost: LoopCounter
    baseline: LoopCounter
    saved: LoopCounter
    input: LoopCounter
    creation: LoopCounter
    read: LoopCounter
    output: LoopCounter
    duration: LoopHistogram


class OutboxGauges(Collector):
    """The billing outbox's backlog, read at each scrape (on the loop: ``MetricsEndpoint``)."""

    PENDING = (
        "cachemesh_router_outbox_pending",
        "Bills the billing outbox keeps now, not yet taken by prefix-cache",
    )
    OLDEST_AGE = (
        "cachemesh_router_outbox_oldest_age_seconds",
        "Seconds since the oldest bill the billing outbox keeps was first kept (0: none)",
    )

    def __init__(self, backlog: Callable[[], Backlog]) -> None:
        self._backlog = backlog

    def describe(self) -> Iterator[Metric]:
        """The two families, without reading the outbox: the registry knows their names at
        registration, so a second registration raises there (start-up), not at a scrape."""
        yield GaugeMetricFamily(*self.PENDING)
        yield GaugeMetricFamily(*self.OLDEST_AGE)

    def collect(self) -> Iterator[Metric]:
        backlog = self._backlog()
        yield GaugeMetricFamily(*self.PENDING, value=backlog.pending)
        yield GaugeMetricFamily(*self.OLDEST_AGE, value=backlog.oldest_age_s)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, tenants: TenantLabels) -> None:
        self._tenants = tenants
        self._registry = registry
        m = LoopMetrics(registry)
        tenant_layer = ("tenant", "served_by")
        self._requests = m.counter(
            "cachemesh_router_requests",
            "Requests answered, by tenant, answering model, tier and the layer that served",
            ("tenant", "model", "tier", "served_by"),
        )
        self._replays = m.counter(
            "cachemesh_router_replays",
            "Retries answered from the answer-once table (not served or billed again)",
            ("tenant",),
        )
        self._errors = m.counter(
            "cachemesh_router_errors",
            "Requests refused or failed, by gRPC status code (DEADLINE_EXCEEDED: deadline, "
            "whose: client, or router for ROUTER_MODEL_TIMEOUT_S)",
            ("tenant", "code", "deadline"),
        )
        self._duration = m.histogram(
            "cachemesh_router_request_duration_seconds",
            "Whole request, from the Gateway call to its last chunk",
            ("served_by",),
        )
        self._ttft = m.histogram(
            "cachemesh_router_ttft_seconds",
            "Time to a model call's first token, from the request's arrival",
            ("tier",),
        )
        self._dependency = m.histogram(
            "cachemesh_router_dependency_duration_seconds",
            "Calls to semantic-cache, prefix-cache and the model replicas",
            ("method", "code"),
        )
        self._cost = m.counter(
            "cachemesh_router_cost_nanos", "What the answers cost, in nano-dollars", tenant_layer
        )
        self._corrections = m.counter(
            "cachemesh_router_cost_corrections_nanos",
            "Bills made by the billing outbox's replays minus the estimates the cost counters "
            "counted for them, in nano-dollars, by direction (up: billed more; down: billed "
            "less): cost plus up minus down is what was billed",
            ("tenant", "direction"),
        )
        self._baseline = m.counter(
            "cachemesh_router_baseline_nanos",
            "What the answers would have cost with no cache of any kind, in nano-dollars",
            tenant_layer,
        )
        self._saved = m.gauge(
            "cachemesh_router_saved_nanos",
            "Baseline minus cost, in nano-dollars, summed (negative on a cache write's turn)",
            tenant_layer,
        )
        self._tokens = m.counter(
            "cachemesh_router_tokens",
            "Tokens of the answers' usage by type (input excludes the cache tokens)",
            ("tenant", "served_by", "type"),
        )
        self._degraded = m.counter(
            "cachemesh_router_degraded",
            "Dependency calls that failed and degraded the request, by gRPC status",
            ("dependency", "reason"),
        )
        self._decisions = m.counter(
            "cachemesh_router_decisions",
            "The tier each model call went to, and why",
            ("tier", "reason"),
        )
        self._ejections = m.counter(
            "cachemesh_router_replica_ejections",
            "Model replicas ejected for a cool-off after consecutive failures, by model",
            ("model",),
        )
        self._outbox_refused = m.counter(
            "cachemesh_router_outbox_refused",
            "Requests refused before their model call: the billing outbox in memory was full, "
            "or its journal could not write while prefix-cache took no bill",
        )()
        self._open_calls_settled = m.counter(
            "cachemesh_router_open_calls_settled",
            "Model calls left without their FINAL (a killed router) billed from the journal",
        )()
        self._outbox_dropped = m.counter(
            "cachemesh_router_outbox_dropped",
            "Billing-outbox entries refused for good by prefix-cache, or held in memory and "
            "lost at shutdown (their bills never made)",
        )()
        self._journal_sync_failed = m.counter(
            "cachemesh_router_journal_sync_failures",
            "Billing-outbox journal syncs and writes that failed (a failed fsync, until a "
            "rewrite succeeds; a full disk), or its file found removed: bills that had to be "
            "kept were refused",
        )()
        self._settles_lost = m.counter(
            "cachemesh_router_limits_settles_lost",
            "Settles of the limits' store dropped before it answered (costs never counted)",
        )()
        self._store_resets = m.counter(
            "cachemesh_router_limits_store_resets",
            "Losses of the limits' Redis counts this router found (every tenant's limits "
            "counted from zero after)",
        )()
        self._ledger_failures = m.counter(
            "cachemesh_router_answer_ledger_failures",
            "Answer-ledger calls to Redis that failed or timed out, by operation (the request "
            "went on without its answer-once protection across routers)",
            ("operation",),
        )
        for operation in LEDGER_OPERATIONS:  # each at 0 from the start, for rate() and alerts
            self._ledger_failures(operation)
        self._breaker_opens = m.counter(
            "cachemesh_router_redis_breaker_opens",
            "Times a Redis client of the router stopped calling its Redis for "
            "ROUTER_REDIS_BREAKER_S after calls failed or timed out in a row",
            ("client",),
        )
        for client in REDIS_CLIENTS:
            self._breaker_opens(client)
        self._hangs = m.counter(
            "cachemesh_router_breaker_opens",
            "Hangs of a dependency: times calls to it timed out in a row and the router stopped "
            "calling it for ROUTER_PREFIX_BREAKER_S / ROUTER_SEMANTIC_BREAKER_S (once a hang, "
            "not at each failed trial)",
            ("dependency",),
        )
        for dependency in DEPENDENCIES:
            self._hangs(dependency)
        self._tenant_l1_opens = m.counter(
            "cachemesh_router_l1_tenant_breaker_opens",
            "Times semantic-cache was left alone for one tenant after its Lookups timed out in "
            "a row while other tenants' were answered (its own backlog in L1)",
        )()
        self._admin_auth_failures = m.counter(
            "cachemesh_router_admin_auth_failures",
            "Admin API calls refused for their credential, by reason (missing, wrong, "
            "ambiguous: more than one authorization header)",
            ("reason",),
        )
        for reason in ADMIN_AUTH_REASONS:  # each at 0 from the start: an alert sees the first
            self._admin_auth_failures(reason)
        self.in_flight = m.gauge(
            "cachemesh_router_requests_in_flight", "Gateway calls in progress"
        )()
        self._token_usage = m.histogram(
            "gen_ai_client_token_usage",
            "GenAI: tokens used by the model calls (OpenTelemetry semantic conventions)",
            (*_GEN_AI, "gen_ai_token_type"),
            TOKEN_BUCKETS,
        )
        self._operation = m.histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI: duration of the model calls (OpenTelemetry semantic conventions)",
            (*_GEN_AI, "error_type"),
            DURATION_BUCKETS,
        )
        self._answered: dict[tuple[str, str, str, str], _Answered] = {}

    def known(self, tenants: Iterable[str], models: Iterable[ModelSpec]) -> None:
        """The series whose labels are known at start-up, each at 0 from then on (as
        ``answer_ledger_failures`` and the breakers' opens are): Prometheus's ``rate`` and
        ``increase`` see a series' first event only as a step from a sample before it, so a
        series that first shows at 1 loses that event (a dashboard undercounts, an alert on
        one event stays silent). ``tenants``: the key file's, up to the tenant cap (those past
        it are ``_other``'s, created here too once the cap is reached); ``models``: the served
        rows (their layers' answers, their replicas' ejections)."""
        specs = list(models)
        labels = list(dict.fromkeys(self._tenants(tenant) for tenant in tenants))
        for tenant in labels:
            for spec in specs:
                for layer in SERVED_LAYERS:
                    key = (tenant, spec.id, spec.tier, layer)
                    if key not in self._answered:
                        self._answered[key] = self._bundle(*key)
            for code in TENANT_CODES:
                self._errors(tenant, code, deadline_label(code, False))
            self._errors(tenant, "DEADLINE_EXCEEDED", ROUTER_DEADLINE)
            self._cost(tenant, UNANSWERED)
            self._corrected(tenant)
        for code in ("UNAUTHENTICATED", "INVALID_ARGUMENT"):  # before a key is recognised
            self._errors(NONE, code, "")
        self._duration(ERROR_LAYER)
        for spec in specs:
            self._ejections(spec.id)
        for dependency in (*DEPENDENCIES, LIMITS):
            for reason in DEGRADED_REASONS:
                self._degraded(dependency, reason)
        for dependency in DEPENDENCIES:
            self._degraded(dependency, CUT_BY_CLIENT)

    def answered(self, tenant: str, end: pb.CompleteResponse, seconds: float) -> None:
        bundle = self._money(tenant, end)
        bundle.requests.value += 1
        bundle.duration.observe(seconds)

    def unreceived(self, tenant: str, end: pb.CompleteResponse) -> None:
        """An answer billed in full whose caller left before it reached it (the call is an
        error, ``failed``): its money and tokens under the layer that served it, no request."""
        self._money(tenant, end)

    def _money(self, tenant: str, end: pb.CompleteResponse) -> _Answered:
        layer = LAYERS.get(end.served_by, "none")
        key = (self._tenants(tenant), end.model, end.tier, layer)
        bundle = self._answered.get(key)
        if bundle is None:
            bundle = self._answered[key] = self._bundle(*key)
        cost, usage = end.cost, end.usage
        bundle.cost.value += cost.cost_nanos
        bundle.baseline.value += cost.baseline_nanos
        bundle.saved.value += cost.saved_nanos
        bundle.input.value += usage.input_tokens
        bundle.creation.value += usage.cache_creation_input_tokens
        bundle.read.value += usage.cache_read_input_tokens
        bundle.output.value += usage.output_tokens
        return bundle

    def _bundle(self, tenant: str, model: str, tier: str, layer: str) -> _Answered:
        def tokens(kind: str) -> LoopCounter:
            return self._tokens(tenant, layer, kind)

        self._corrected(tenant)

        return _Answered(
            requests=self._requests(tenant, model, tier, layer),
            cost=self._cost(tenant, layer),
            baseline=self._baseline(tenant, layer),
            saved=self._saved(tenant, layer),
            input=tokens("input"),
            creation=tokens("cache_creation"),
            read=tokens("cache_read"),
            output=tokens("output"),
            duration=self._duration(layer),
        )

    def unanswered(self, tenant: str, usage: pb.Usage, cost: pb.Cost) -> None:
        """A model call billed without an answer: its money and tokens, no request."""
        labels = (self._tenants(tenant), UNANSWERED)
        self._corrected(labels[0])
        self._cost(*labels).inc(cost.cost_nanos)
        self._baseline(*labels).inc(cost.baseline_nanos)
        self._saved(*labels).inc(cost.saved_nanos)
        for kind, count in (
            ("input", usage.input_tokens),
            ("cache_creation", usage.cache_creation_input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("output", usage.output_tokens),
        ):
            self._tokens(*labels, kind).inc(count)

    def cost_corrected(self, tenant: str, correction_nanos: int) -> None:
        """A bill the billing outbox's replay made: what it cost minus what the cost counters
        counted for it (the router's estimate, or nothing for a call no bill of the router's
        counted: a killed router's), counted by its sign (a counter never decreases)."""
        up, down = self._corrected(self._tenants(tenant))
        if correction_nanos > 0:
            up.inc(correction_nanos)
        elif correction_nanos < 0:
            down.inc(-correction_nanos)

    def _corrected(self, label: str) -> tuple[LoopCounter, LoopCounter]:
        """A tenant's correction counters (``label``: its capped label), created at 0 with its
        first cost counter: a dashboard's cost adds them by tenant, and a tenant missing
        either series would drop out of the sum."""
        return self._corrections(label, UP), self._corrections(label, DOWN)

    def replayed(self, tenant: str) -> None:
        self._replays(self._tenants(tenant)).inc()

    def failed(
        self, tenant: str, code: str, seconds: float, *, routers_deadline: bool = False
    ) -> None:
        """A Gateway call that failed with ``code``; ``routers_deadline``: a DEADLINE_EXCEEDED
        at the router's ROUTER_MODEL_TIMEOUT_S (``model_answer.DeadlineCut``), not the caller's."""
        self._errors(self._tenants(tenant), code, deadline_label(code, routers_deadline)).inc()
        self._duration(ERROR_LAYER).observe(seconds)

    def first_token(self, tier: str, seconds: float) -> None:
        self._ttft(tier).observe(seconds)

    def dependency(self, method: str, code: str, seconds: float) -> None:
        self._dependency(method, code).observe(seconds)

    def degraded(self, dependency: str, reason: str) -> None:
        self._degraded(dependency, reason).inc()

    def ejected(self, model: str) -> None:
        self._ejections(model).inc()

    def outbox_refused(self) -> None:
        self._outbox_refused.inc()

    def outbox_backlog(self, backlog: Callable[[], Backlog]) -> None:
        """The billing outbox's gauges, read from ``backlog`` at each scrape (once)."""
        self._registry.register(OutboxGauges(backlog))

    def open_calls_settled(self, count: int) -> None:
        self._open_calls_settled.inc(count)

    def outbox_dropped(self, count: int) -> None:
        self._outbox_dropped.inc(count)

    def journal_sync_failed(self, count: int) -> None:
        self._journal_sync_failed.inc(count)

    def settles_lost(self, count: int) -> None:
        self._settles_lost.inc(count)

    def limits_store_reset(self) -> None:
        self._store_resets.inc()

    def ledger_failed(self, operation: LedgerOperation) -> None:
        """A call to the answer ledger's Redis failed or did not answer in time."""
        self._ledger_failures(operation).inc()

    def redis_breaker_opened(self, client: RedisClient) -> None:
        """``client``'s Redis is left alone for ROUTER_REDIS_BREAKER_S (again)."""
        self._breaker_opens(client).inc()

    def breaker_opened(self, dependency: Dependency) -> None:
        """A hang of ``dependency`` starts: its breaker first leaves it alone."""
        self._hangs(dependency).inc()

    def l1_tenant_left_alone(self) -> None:
        """L1 is left alone for one tenant's Lookups (its breaker of its own opened)."""
        self._tenant_l1_opens.inc()

    def admin_auth_failed(self, reason: AdminAuthReason) -> None:
        """An Admin call refused for its credential (``admin_auth.AuthFailures``)."""
        self._admin_auth_failures(reason).inc()

    def decided(self, tier: str, reason: str) -> None:
        self._decisions(tier, reason).inc()

    def model_call(
        self,
        provider: str,
        request_model: str,
        response_model: str,
        usage: pb.Usage | None,
        seconds: float,
        error_type: str = "",
    ) -> None:
        """One model call ended (``error_type``: how it failed, "" for an answer); ``usage``:
        what it was billed (None: nothing known, e.g. its bill was lost)."""
        names = ("chat", provider, request_model, response_model)
        self._operation(*names, error_type).observe(seconds)
        if usage is not None:
            prompt = usage.input_tokens + usage.cache_creation_input_tokens
            prompt += usage.cache_read_input_tokens
            self._token_usage(*names, "input").observe(prompt)
            self._token_usage(*names, "output").observe(usage.output_tokens)


def deadline_label(code: str, routers_deadline: bool) -> str:
    """``cachemesh_router_errors_total``'s ``deadline``: whose deadline a DEADLINE_EXCEEDED was
    (``router``: ROUTER_MODEL_TIMEOUT_S cut a model call still answering; ``client``: the
    caller's own), empty (no label) for every other code."""
    if code != "DEADLINE_EXCEEDED":
        return ""
    return ROUTER_DEADLINE if routers_deadline else CLIENT_DEADLINE


def decision_reason(tier_reason: str, decision: Decision | None) -> str:
    """The closed set of ``cachemesh_router_decisions_total``'s reasons (the decision's own
    reason is free text: on the span and the response, never a label)."""
    if tier_reason.startswith("fallback"):
        return "fallback"
    if decision is None:
        return "requested"
    if decision.moved_by_costs:
        return "cost_aware"
    return "threshold"
