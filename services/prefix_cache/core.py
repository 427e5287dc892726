"""Plan, Commit and Totals without gRPC: validation, the stores and the pure rules wired up.

Errors are exceptions the servicer maps to status codes: ``BadRequest`` and ``RuleViolation``
→ INVALID_ARGUMENT, ``NoWarmCommit``, ``PlanGone`` and ``TableLacksModel`` (with its
``WarmModelUnknown``) → FAILED_PRECONDITION, ``NotReady`` → UNAVAILABLE. Every check runs
before any state changes, so bad input changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import Clock, Throttles, suppressed
from services.common.errors import shown
from services.common.keyfile import tenant_error
from services.common.kv_blocks import KvHashMemo, own_reuse
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.prompt import canonical_blocks, prompt_digest, prompt_token_ids
from services.common.tokens import Tokenizer, Tokenizers
from services.prefix_cache.auto_rules import plan_for, scope_for
from services.prefix_cache.commit_records import CommitRecord, Final, Stood
from services.prefix_cache.keyed_lock import KeyedLock
from services.prefix_cache.ledger import CommitLedger
from services.prefix_cache.metrics import PrefixCacheMetrics
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.pricing import charge
from services.prefix_cache.reconcile import reported_usage
from services.prefix_cache.replica_view import EngineReuse, ReplicaViews
from services.prefix_cache.rules import Probe, PromptPlan, Split, settle
from services.prefix_cache.sites import sites_of
from services.prefix_cache.totals import TenantTotals
from services.prefix_cache.warm import WarmStore, read_time

# A prompt up to this size (the serialized request) and this many parts (tools, system blocks,
# message blocks) is canonicalized, tokenized and hashed on the event loop: at most ~1.4 ms
# at the ~5M tokens/s and ~4 us a part measured here, where the worker-thread handoff around
# it was ~15% of prefix-cache's samples under load (an agent request: 16-74 parts). A larger
# one goes to a worker thread (tiktoken releases the GIL) so that it never stalls the loop
# for long: 32 kB of one-character blocks (6,400 parts) takes ~26 ms.
INLINE_PROMPT_BYTES = 32 * 1024
INLINE_PROMPT_PARTS = 256
# The most tokens a count may hold (2^31, ~2.1 billion: beyond any context or output), so that
# every bill fits in int64 nano-dollars; a larger one is refused before anything is written.
MAX_TOKENS = 1 << 31
# the WARM's span attribute naming why a replica's view was forgotten ("engine_restart": the
# WARM's engine run is a new one there, GenerateStart.engine_instance)
VIEW_WIPE_ATTRIBUTE = "cachemesh.view_wipe_reason"
# What a kept Prompt costs in the plan memo's budget (PREFIX_CACHE_PLAN_MEMO_BLOCKS), in units
# of one KV block hash (~75 bytes with its list slot), measured with tracemalloc: a Prompt with
# no block is ~800 bytes (the plan, scope, digest and the memo's entry), and each read probe
# or write (a dataclass with its 64-character digest) ~160-185 bytes.
PLAN_OVERHEAD_BLOCKS = 11
PROBE_BLOCKS = 3
# TotalsBatch: the most tenants one call may ask for (a reply of ~100 bytes a tenant)
TOTALS_BATCH_MAX = 1000
# a refusal for a model this replica's table lacks logged at most once this often (the first
# at once): one a request otherwise, for as long as a rolling deploy lasts
TABLE_LACKS_LOG_EVERY_MS = 10_000

log = logging.getLogger("cachemesh.prefix_cache")


class BadRequest(ValueError):
    """INVALID_ARGUMENT; the message names the field."""


class NoWarmCommit(LookupError):
    """FAILED_PRECONDITION: FINAL without an earlier WARM for the request id."""


class PlanGone(LookupError):
    """FAILED_PRECONDITION: a WARM commit named a plan this process no longer holds and sent
    no request; send the request with it."""


class TableLacksModel(ValueError):
    """FAILED_PRECONDITION: a call names a model (not ``auto``) this replica's model table
    lacks. The router sends only models of its own table, so this is no bad request of the
    caller's: prefix-cache replicas (or the router) run different model tables (a rolling
    deploy, or CACHEMESH_MODELS_FILE differing). Not a ``BadRequest`` (INVALID_ARGUMENT, which
    the router passes on to its caller as the caller's fault)."""


class WarmModelUnknown(TableLacksModel):
    """FAILED_PRECONDITION: a FINAL whose WARM record (written by another prefix-cache replica
    on the same Redis, or by this one before its model table changed) names a model this
    replica's model table lacks: it cannot be priced here. A ``ValueError``, as the ledger's
    ``Bill`` refuses (nothing written); not a ``BadRequest``: the request is not at fault."""


class NotReady(RuntimeError):
    """UNAVAILABLE: the tokenizer is still loading."""


class TokenizerSlot:
    """Filled by the service's warm-up (each row's tokenizer); empty until then. One
    ``Tokenizer`` stands for the only vocabulary (tests and tools whose rows all use it)."""

    def __init__(self, tokenizers: Tokenizers | Tokenizer | None = None) -> None:
        self._tokenizer = Tokenizers.of(tokenizers) if tokenizers is not None else None

    def set(self, tokenizers: Tokenizers | Tokenizer) -> None:
        self._tokenizer = Tokenizers.of(tokenizers)

    def loaded(self) -> Iterable[Tokenizer]:
        """Every tokenizer set (none before the warm-up): what the metrics read."""
        return self._tokenizer if self._tokenizer is not None else ()

    def get(self, spec: ModelSpec) -> Tokenizer:
        """The tokenizer ``spec``'s prompts are counted with."""
        if self._tokenizer is None:
            raise NotReady("prefix-cache is still loading its tokenizer; retry shortly")
        return self._tokenizer.for_spec(spec)


@dataclass(frozen=True)
class Candidate:
    replica: str
    warm_prefix_tokens: int


@dataclass(frozen=True)
class Prompt:
    """One request's prompt as prefix-cache sees it, computed once per request."""

    plan: PromptPlan
    scope: tuple[str, ...]
    kv_hashes: list[bytes]  # the replica's block hashes of the prompt (L3)
    digest: str = ""  # the canonical prompt's chained digest (its last block's)
    # when its Plan ran: the request's arrival, when the provider looked its cache up (None:
    # computed by the WARM itself, as no Plan of this process holds it)
    planned_at_ms: int | None = None
    # each candidate replica's view then (ReplicaViews.mark): what the view learned later is
    # no evidence of what the engine held when it prefilled this request
    view_marks: Mapping[str, int] = field(default_factory=dict)

    @property
    def weight(self) -> int:
        """Its memory in KV block hashes' worth (the plan memo's budget): a fixed overhead
        plus its hashes, probes and writes, so that short prompts are not nearly free."""
        probes = len(self.plan.probes) + len(self.plan.writes)
        overhead = PLAN_OVERHEAD_BLOCKS + len(self.view_marks)  # a mark: ~a hash's memory
        return overhead + len(self.kv_hashes) + PROBE_BLOCKS * probes


@dataclass(frozen=True)
class PlanResult:
    split: Split
    candidates: tuple[Candidate, ...]
    prompt: Prompt
    plan_id: str = ""  # names the computed prompt for the WARM commit ("" = not kept)


class PrefixCacheCore:
    def __init__(
        self,
        *,
        table: ModelTable,
        tokenizer: TokenizerSlot,
        cache: WarmStore,
        views: ReplicaViews,
        ledger: CommitLedger,
        clock: Clock,
        lookback: int,
        plans: PlanMemo[Prompt] | None = None,
        metrics: PrefixCacheMetrics | None = None,
        kv_memo: KvHashMemo | None = None,
    ) -> None:
        """``metrics``: the service's (None: the offline estimator's core); ``kv_memo``: the
        recent prompts' KV block hashes (None: each prompt hashed in full)."""
        self._metrics = metrics
        self._table = table
        self._tokenizer = tokenizer
        self._cache = cache
        self._views = views
        self._ledger = ledger
        self._clock = clock
        self._lookback = lookback
        self._plans = plans if plans is not None else PlanMemo(clock, ttl_ms=0, max_blocks=0)
        self._commit_locks = KeyedLock()  # per (tenant, request id)
        self._kv_memo = kv_memo if kv_memo is not None else KvHashMemo(0)
        self._lacking = Throttles(clock, TABLE_LACKS_LOG_EVERY_MS)

    async def plan(
        self, tenant: str, model: str, request: pb.CompleteRequest | None, replicas: Sequence[str]
    ) -> PlanResult:
        _require_tenant(tenant)
        spec = self._spec(model, "model")
        prompt = await self._prompt(tenant, request, spec)
        total = prompt.plan.prompt_tokens
        candidates = [Candidate(r, self._views.match(r, prompt.kv_hashes, total)) for r in replicas]
        candidates.sort(key=lambda c: -c.warm_prefix_tokens)  # stable: ties keep input order
        now = self._clock.now_ms()  # the request's arrival: the provider looks up its cache
        if spec.rules == "self_hosted":  # the replica's KV cache is the cache
            read = candidates[0].warm_prefix_tokens if candidates else 0
        else:
            hit = await self._cache.longest(prompt.scope, prompt.plan.probes, now)
            read = hit.tokens if hit else 0
        marks = {r: self._views.mark(r) for r in replicas}
        prompt = replace(prompt, planned_at_ms=now, view_marks=marks)
        plan_id = self._plans.put(tenant, spec.id, prompt)
        if self._metrics is not None:
            self._metrics.planned(spec.id)
        return PlanResult(settle(prompt.plan, read), tuple(candidates), prompt, plan_id)

    async def warm(
        self,
        tenant: str,
        request_id: str,
        model: str,
        request: pb.CompleteRequest | None,
        replica: str,
        kv_cached_tokens: int = 0,
        max_read_tokens: int | None = None,
        plan_id: str = "",
        *,
        kv_cached_unreported: bool = False,
        planned_at_ms: int | None = None,
        arrived_at_ms: int | None = None,
        stalled_warm: Sequence[str] = (),
        replica_instance: str = "",
    ) -> Split:
        """The first token arrived from ``replica``, which reported ``kv_cached_tokens``
        (unless ``kv_cached_unreported``: a provider adapter learns its engine's KV reuse
        only from the usage at the end). A self-hosted row's read is the one this tenant's
        view of ``replica`` predicts, as llama.cpp's prompt cache and vLLM's / SGLang's
        automatic prefix caching reuse what the replica holds; the engine's report, now or at
        the FINAL, can lower it but never raise it: the engine's cache is shared by every
        tenant, and its reuse beyond that may be another tenant's prompt.

        ``max_read_tokens`` is the read predicted when the request arrived: prefixes warmed
        after that (by a concurrent request) are not read, as the provider looked up on arrival;
        with the Plan held here, it is settled with ``max_read_tokens`` as a replay is (below),
        as another replica would: the read is the Plan's, even if its entry expired or was lost
        since (a Redis restarted empty, a flush, an eviction: judged again, the provider's read
        was billed as a write); refresh and writes happen now, and last their ttl from the
        Plan's time (the request's start, as the provider counts them).
        ``plan_id`` names the Plan of this request: its prompt is reused, not computed again
        (``request`` may then be None; if the plan is gone, ``PlanGone`` asks for it).

        ``planned_at_ms`` (with ``max_read_tokens``) is the arrival a replay of the router's
        billing outbox carries, maybe long after it, or the router's live WARM sent again with
        its request when this process no longer holds the Plan (``Calls.commit_warm``,
        moments after it): the read is the Plan's, not judged again against a warm state that
        may have expired or been lost (a restart) since, and the refresh and writes last their
        ttl from the arrival (one run out since is not warm again).

        ``arrived_at_ms`` is the router's own time of the model call, sent when it had no Plan
        (it failed or timed out) and used only without ``max_read_tokens`` and ``planned_at_ms``:
        the WARM is judged as a held Plan's is, at that time (``read_time``), not reading what
        was written after it (a concurrent request's). It is a field of its own, not
        ``planned_at_ms`` without ``max_read_tokens``, which an older prefix-cache refuses: in a
        rolling upgrade that one ignores it and judges at the first token, as it always did.

        ``stalled_warm``: the replicas this request's call stalled on (handed over before its
        first report) while its Plan predicted them warm: each is taken as a report of nothing
        reused there (``ReplicaViews.stalled``), with the Plan held here (its marks of the
        views); without it, not (no evidence of when the view was wrong).

        ``replica_instance``: the engine run that answered on ``replica``
        (``GenerateStart.engine_instance``; empty: not known). A run new there after another
        (the engine restarted, its KV cache gone) forgets the replica's view, every tenant's
        blocks, before this WARM's read is judged (``ReplicaViews.engine``); a late WARM
        records nothing there and wipes nothing: one of a run before the current one (a call
        that ended before the restart), or one of an unseen run whose call (its Plan's time:
        ``planned_at_ms``, else the held Plan's; else ``arrived_at_ms``) was made before the
        current run's first WARM here. ``planned_at_ms`` is no sign of lateness by itself: the
        router sends it with a live WARM whose Plan this process does not hold (a restart, the
        memo's eviction, another process), moments after the Plan; the billing outbox's replay
        names no replica nor run, and the open-call journal's WARM names its held Plan.
        """
        for other in stalled_warm:
            if not other or other == replica:
                raise BadRequest(
                    "stalled_warm_replicas must name replicas other than the WARM's own "
                    f"({shown(replica)}), none empty; got {shown(other)}"
                )
        if max_read_tokens is not None and max_read_tokens < 0:
            raise BadRequest(f"max_read_tokens must be >= 0, got {max_read_tokens}")
        if planned_at_ms is not None:
            if planned_at_ms < 0:
                raise BadRequest(f"planned_at_ms must be >= 0, got {planned_at_ms}")
            if max_read_tokens is None:
                raise BadRequest(
                    "planned_at_ms needs max_read_tokens (both from the request's Plan): send "
                    "the Plan's read with it, or neither (without a Plan: arrived_at_ms)"
                )
        if arrived_at_ms is not None and arrived_at_ms < 0:
            raise BadRequest(f"arrived_at_ms must be >= 0, got {arrived_at_ms}")
        _require_tenant(tenant)
        _require(request_id, "request_id")
        spec = self._spec(model, "model")
        # one ledger read, under the request's lock: a retry (or a concurrent twin) finds the
        # record before it takes the plan, whose prompt only the first WARM needs
        async with self._commit_locks.hold((tenant, request_id)):
            done = await self._ledger.get(tenant, request_id, self._clock.now_ms())
            if done is not None:
                if done.model != spec.id:  # as the FINAL checks: a replay is the same call
                    raise BadRequest(
                        f"model {shown(model)} differs from {done.model!r} of the WARM commit "
                        f"for request_id {shown(request_id)}; a retried WARM sends the same model"
                    )
                return done.split
            # the plan is taken only once the WARM is known valid (below): a refused one leaves
            # it for the WARM sent right (before, that one found it gone: PlanGone)
            held = self._plans.held(plan_id, tenant, spec.id) if plan_id else None
            prompt = held
            if prompt is None:
                if request is None and plan_id:
                    raise PlanGone(
                        f"plan_id {shown(plan_id)} is not held by this prefix-cache (expired, or "
                        "made by another process): send the request with the WARM commit"
                    )
                prompt = await self._prompt(tenant, request, spec)
            plan = prompt.plan
            if not 0 <= kv_cached_tokens < max(plan.prompt_tokens, 1):
                raise BadRequest(
                    f"kv_cached_tokens must be within [0, {plan.prompt_tokens}) for this prompt "
                    f"of {plan.prompt_tokens} tokens, got {kv_cached_tokens}"
                )
            if held is not None:  # no await since ``held``: no other WARM took it meanwhile
                self._plans.take(plan_id, tenant, spec.id)
            now = self._clock.now_ms()
            # the call's time: its Plan's (a replay's, or the held Plan's), or the router's
            called = planned_at_ms if planned_at_ms is not None else prompt.planned_at_ms
            if called is None:
                called = arrived_at_ms if arrived_at_ms is not None else now
            current = (
                self._engine(spec.id, replica, replica_instance, min(called, now))
                if replica
                else None
            )
            # the replica's report of its KV reuse, if it could give one at its first token
            reported = None if kv_cached_unreported else kv_cached_tokens
            if spec.rules == "self_hosted":
                # the engine's KV cache is shared by every tenant: the read is what this
                # tenant's own (tenant-salted) view says its traffic left on the replica, and
                # the engine's report can only lower it (a restart, an eviction), never add
                # the reuse of another tenant's prompt to this one's bill or usage
                own = self._views.match(replica, prompt.kv_hashes, plan.prompt_tokens)
                read = own if reported is None else min(own, reported)
                split = settle(plan, read if replica else 0)
            else:
                probes = plan.probes
                if max_read_tokens is not None:
                    probes = tuple(p for p in probes if p.tokens <= max_read_tokens)
                arrived = planned_at_ms
                if arrived is None and max_read_tokens is not None:
                    # a held Plan with its read: that read stands, as on a replay (the warm
                    # state may have lost the entry since the arrival: a Redis restarted empty
                    # or flushed, an eviction), so the bill is the same on every replica
                    arrived = prompt.planned_at_ms
                if arrived is not None:
                    split = await self._replayed(prompt, probes, arrived, now)
                else:
                    if (
                        arrived_at_ms is not None
                        and max_read_tokens is None
                        and prompt.planned_at_ms is None
                    ):
                        # no Plan: the router's time of the arrival stands for it
                        prompt = replace(prompt, planned_at_ms=arrived_at_ms)
                    # the probes as the provider found them on arrival; refresh and writes
                    # now, their lifetime counted from the request's start (the arrival)
                    read_at = read_time(prompt.planned_at_ms, now)
                    hit = await self._cache.settle(
                        prompt.scope, probes, plan.writes, now, read_at, prompt.planned_at_ms
                    )
                    split = settle(plan, hit.tokens if hit else 0)
            if replica and current is not False:  # not a restarted engine's late WARM
                # an engine that reports at the end only: its FINAL scores this prediction
                # (one that reports now counts as the WARM does: kv_cached_tokens' range)
                awaiting = (tenant, request_id) if spec.rules == "self_hosted" else None
                told = None if reported is None else EngineReuse(reported, plan.prompt_tokens)
                since = prompt.view_marks.get(replica)  # None: no Plan of it held here
                before = self._view_corrections()
                self._views.record(
                    replica, prompt.kv_hashes, plan.prompt_tokens, told, awaiting, since
                )
                self._count_corrections(spec.id, "report", before)
                for other in dict.fromkeys(stalled_warm):
                    mark = prompt.view_marks.get(other)  # None: no Plan of it held here
                    if mark is not None:
                        before = self._view_corrections()
                        self._views.stalled(other, prompt.kv_hashes, plan.prompt_tokens, mark)
                        self._count_corrections(spec.id, "stall", before)
            # another prefix-cache replica may have recorded this request id meanwhile: its
            # record stands (the warm-state refresh made here only repeats the same writes)
            stood = await self._ledger.put_warm(tenant, request_id, spec.id, replica, split, now)
            return stood.split

    async def _replayed(
        self, prompt: Prompt, probes: tuple[Probe, ...], arrived_ms: int, now_ms: int
    ) -> Split:
        """A replayed WARM settled as on its arrival: the read is the longest probe within the
        Plan's read (``probes``), as the provider found it then, whatever the warm state holds
        now; the entry read is refreshed, and the writes made, with lifetimes from the arrival,
        so one whose ttl has run out since is not warm again (the provider's is gone)."""
        arrived = min(arrived_ms, now_ms)
        read = max(probes, key=lambda p: p.tokens, default=None)
        await self._cache.settle(
            prompt.scope,
            () if read is None else (read,),
            prompt.plan.writes,
            now_ms,
            arrived,
            arrived,
        )
        return settle(prompt.plan, read.tokens if read is not None else 0)

    async def final(
        self,
        tenant: str,
        request_id: str,
        model: str,
        output_tokens: int,
        kv_cached_tokens: int,
        baseline_model: str,
        provider_usage: pc.ProviderUsage | None = None,
    ) -> Final:
        """The bill that stands for the commit key (``final_commit``'s, without whether it
        was recorded before)."""
        stood = await self.final_commit(
            tenant,
            request_id,
            model,
            output_tokens,
            kv_cached_tokens,
            baseline_model,
            provider_usage,
        )
        return stood.final

    async def final_commit(
        self,
        tenant: str,
        request_id: str,
        model: str,
        output_tokens: int,
        kv_cached_tokens: int,
        baseline_model: str,
        provider_usage: pc.ProviderUsage | None = None,
    ) -> Stood:
        """Bills the commit key once: the first FINAL (of any replica) is priced, recorded
        and totalled; a later one gets that bill back, ``repeated``."""
        _require_tenant(tenant)
        _require(request_id, "request_id")
        _count(output_tokens, "output_tokens")
        _count(kv_cached_tokens, "kv_cached_tokens")
        baseline_spec = self._spec(baseline_model, "baseline_model") if baseline_model else None
        # the engine's reuse of the bill that stands, in its own tokens with its count of the
        # prompt (for the view and the metric), set by the last pricing
        engine: list[int] = [0, 0]
        priced: list[ModelSpec] = []  # the WARM's model, set by the last pricing

        def bill(record: CommitRecord) -> Final | Stood:
            """The FINAL priced from ``record`` (the ledger's live WARM record), or the one it
            carries already; refused (BadRequest) before anything is written."""
            if model and model != record.model:
                raise BadRequest(
                    f"model {shown(model)} differs from {record.model!r} of the WARM commit for "
                    f"request_id {shown(request_id)}; send the same model or leave it empty"
                )
            if record.final is not None:
                return Stood(record.final, repeated=True)
            # the WARM's model, checked at the WARM against the table of the replica that took
            # it: another replica's (a rolling deploy of another table) may lack it
            spec = self._warm_spec(record, request_id)
            priced[:] = [spec]
            base = baseline_spec or spec
            estimate = charge(record.split, output_tokens, spec, base)
            own = spec.rules == "self_hosted"  # a self-hosted read is the tenant's own reuse
            engine_reuse = kv_cached_tokens  # the engine's, for the view and the metric
            engine_prompt = record.split.prompt_tokens  # its count of the prompt, if told
            told_kv = kv_cached_tokens
            if own:  # without the engine's count of the prompt, it counts as the WARM's
                told_kv = min(kv_cached_tokens, _own_read(record.split, engine_prompt))
            final = Final(
                output_tokens,
                told_kv,
                base.id,
                estimate,
                record.split,
                record.split,
                estimate,
                reconciled=False,
            )
            if provider_usage is not None:
                reported = reported_usage(provider_usage, spec)
                _count(reported.output_tokens, "provider_usage output tokens")
                _count(reported.split.prompt_tokens, "provider_usage prompt tokens")
                if output_tokens and output_tokens != reported.output_tokens:
                    raise BadRequest(
                        f"output_tokens ({output_tokens}) differs from the provider's reported "
                        f"output ({reported.output_tokens}); send 0 or the same count"
                    )
                split = reported.split
                if own:  # at most the WARM's read, in the engine's tokens: the reuse this
                    # tenant's traffic left
                    engine_reuse, engine_prompt = split.read_tokens, split.prompt_tokens
                    cap = _own_read(record.split, engine_prompt)
                    split = _at_most_read(split, cap)
                    told_kv = min(kv_cached_tokens, cap)
                billed = charge(split, reported.output_tokens, spec, base)
                final = Final(
                    reported.output_tokens,
                    told_kv,
                    base.id,
                    billed,
                    split,
                    record.split,
                    charge(record.split, reported.output_tokens, spec, base),
                    reconciled=True,
                )
            engine[:] = [engine_reuse, engine_prompt]
            return final

        async with self._commit_locks.hold((tenant, request_id)):
            now = self._clock.now_ms()
            # one atomic step: the first FINAL for the request id (of any replica) is billed
            # and totalled, priced from the WARM record that stands; a racing one gets that
            # FINAL back, as does a repeated one, not priced when the record is read first
            # but priced and its price thrown away when it meets this replica's copy of the
            # WARM (the FINAL standing another replica's), its engine report then scoring this
            # replica's view note below (before the copy, that note waited for its bound)
            placed = await self._ledger.put_final(tenant, request_id, now, bill)
            if placed is None:
                raise _no_warm(request_id)
            record, stood, final = placed.record, placed.stood.final, placed.offered
            if final is None:  # the record carried a FINAL when priced: a repeated FINAL
                return placed.stood
            (spec,) = priced  # ``final`` was priced (so ``priced`` set) from ``record``
            own = spec.rules == "self_hosted"
            engine_reuse, engine_prompt = engine
            if record.replica and own:
                # the engine's reported reuse (not the billed one), in its own tokens with its
                # count of the prompt, scores the view's prediction at the WARM, and corrects
                # the view when the replica held less (a restart, unseen traffic)
                told = stood.reconciled and final.reconciled
                reuse = EngineReuse(engine_reuse, engine_prompt) if told else None
                before = self._view_corrections()
                self._views.report((tenant, request_id), reuse)
                self._count_corrections(record.model, "report", before)
            if self._metrics is not None and not placed.stood.repeated:  # this call billed it
                self._metrics.billed(record.model, stood)
                if own:  # the engine's reuse the tenant's own traffic does not account for
                    unbilled = max(engine_reuse - stood.split.read_tokens, 0)
                    self._metrics.unattributed_kv(record.model, unbilled)
            return placed.stood

    def _engine(self, model: str, replica: str, instance: str, called_at_ms: int) -> bool | None:
        """``ReplicaViews.engine``, its wipe counted (``cause="restart"``) and named on the
        current span (``VIEW_WIPE_ATTRIBUTE``)."""
        before = self._view_corrections()
        current = self._views.engine(replica, instance, called_at_ms)
        if self._view_corrections() != before:
            self._count_corrections(model, "restart", before)
            trace.get_current_span().set_attribute(VIEW_WIPE_ATTRIBUTE, "engine_restart")
        return current

    def _view_corrections(self) -> tuple[int, int]:
        """The replica views' corrections so far, and the blocks they evicted."""
        stats = self._views.stats
        return stats.corrections, stats.corrected_blocks

    def _count_corrections(self, model: str, cause: str, before: tuple[int, int]) -> None:
        """The view's corrections since ``before`` (``_view_corrections``) into the metrics."""
        if self._metrics is not None:
            corrections, blocks = self._view_corrections()
            self._metrics.view_corrected(model, cause, corrections - before[0], blocks - before[1])

    async def warm_prefixes(self) -> int:
        """The warm prefixes held (live or not yet collected). The service asks only of the
        in-memory store (O(1)); of the Redis store it is a keyspace SCAN, for tests."""
        return await self._cache.count()

    async def totals(self, tenant: str) -> TenantTotals:
        _require_tenant(tenant)
        return await self._ledger.totals(tenant)

    async def totals_of(self, tenants: Sequence[str]) -> list[tuple[str, TenantTotals]]:
        """The totals of each distinct tenant of ``tenants`` (1 to ``TOTALS_BATCH_MAX``), in
        the order asked, read at once; a bad name refuses them all, naming it."""
        if not tenants:
            raise BadRequest(f"tenants is required: 1 to {TOTALS_BATCH_MAX:,} tenant names")
        if len(tenants) > TOTALS_BATCH_MAX:
            raise BadRequest(
                f"tenants: at most {TOTALS_BATCH_MAX:,} a call, got {len(tenants):,}; "
                "ask for the rest in further calls"
            )
        distinct = list(dict.fromkeys(tenants))
        for tenant in distinct:
            try:
                _require_tenant(tenant)
            except BadRequest as exc:
                raise BadRequest(f"tenants[{tenants.index(tenant)}]: {exc}") from None
        return list(zip(distinct, await self._ledger.totals_of(distinct), strict=True))

    def _spec(self, model_id: str, field: str) -> ModelSpec:
        """``model_id``'s row in this replica's table: a dict lookup when it has it. Empty or
        ``auto`` is the caller's bad request (``BadRequest``); any other name the table lacks
        is ``TableLacksModel`` (FAILED_PRECONDITION), logged."""
        spec = self._table.get(model_id)
        if spec is not None:
            return spec
        known = ", ".join(sorted(self._table.models))
        if not model_id or model_id == AUTO:
            hint = " (resolve 'auto' to a tier's model first)" if model_id == AUTO else ""
            raise BadRequest(
                f"{field} {shown(model_id)} is not a known model{hint}; use one of: {known}"
            )
        raise self._lacks(
            TableLacksModel(
                f"{field} {shown(model_id)} is not in this prefix-cache replica's model table "
                f"(it has: {known}): a rolling deploy, or CACHEMESH_MODELS_FILE differing "
                "between the router and prefix-cache replicas; give every replica the "
                "router's table"
            ),
            model_id,
        )

    def _warm_spec(self, record: CommitRecord, request_id: str) -> ModelSpec:
        """The model the WARM ``record`` names, from this replica's table; ``WarmModelUnknown``
        when the table lacks it (the record came from Redis, written by a replica of another
        table): refused, nothing written, never an assertion (an UNKNOWN to the router)."""
        spec = self._table.get(record.model)
        if spec is None:
            raise self._lacks(
                WarmModelUnknown(
                    f"the WARM commit for request_id {shown(request_id)} names model "
                    f"{shown(record.model)}, which this prefix-cache replica's model table lacks "
                    "(replicas of different model tables share its Redis: a rolling deploy, or "
                    "CACHEMESH_MODELS_FILE differing); it cannot price the FINAL: send it to a "
                    "replica whose table has the model"
                ),
                record.model,
            )
        return spec

    def _lacks(self, exc: TableLacksModel, model_id: str) -> TableLacksModel:
        """``exc``, said in a WARNING naming the model (at most one a
        ``TABLE_LACKS_LOG_EVERY_MS``, counting those not logged): the refusing replica is
        the one whose table an operator must fix. One throttle for all models (the names come
        from the wire)."""
        due = self._lacking.due("model table lacks")
        if due:
            log.warning(
                "refused a call naming model %s, which this prefix-cache replica's model table "
                "lacks (FAILED_PRECONDITION): replicas of different tables (a rolling deploy, or "
                "CACHEMESH_MODELS_FILE differing); give every replica the router's table%s",
                shown(model_id),
                suppressed(due, TABLE_LACKS_LOG_EVERY_MS),
            )
        return exc

    async def _prompt(
        self, tenant: str, request: pb.CompleteRequest | None, spec: ModelSpec
    ) -> Prompt:
        if request is None:
            raise BadRequest("request is required: send the CompleteRequest being served")
        tokenizer = self._tokenizer.get(spec)
        if _small(request):
            return self._compute(tenant, request, spec, tokenizer)
        # one worker-thread hop for the whole computation (tiktoken releases the GIL)
        return await asyncio.to_thread(self._compute, tenant, request, spec, tokenizer)

    def _compute(
        self, tenant: str, request: pb.CompleteRequest, spec: ModelSpec, tokenizer: Tokenizer
    ) -> Prompt:
        blocks = canonical_blocks(request, tokenizer)
        plan = plan_for(blocks, sites_of(request), spec, self._lookback)
        # the same hashes as ReplicaViews.hashes of the whole prompt, computed only past the
        # longest prefix whose hashes the memo holds (the session's previous turn)
        hashes = self._kv_memo.hashes(tenant, spec.id, blocks, prompt_token_ids(blocks))
        return Prompt(plan, scope_for(spec, tenant, request), hashes, prompt_digest(blocks))


def _own_read(warm: Split, engine_prompt: int) -> int:
    """The most of a self-hosted engine's reuse the tenant's own traffic accounts for, in the
    engine's tokens (its count of the prompt: ``engine_prompt``): the WARM's read (the
    tenant's own view) in them (``own_reuse``)."""
    return own_reuse(warm.read_tokens, warm.prompt_tokens, engine_prompt)


def _at_most_read(split: Split, read: int) -> Split:
    """``split`` with at most ``read`` tokens read: the rest of its read is billed as input."""
    extra = split.read_tokens - read
    if extra <= 0:
        return split
    return replace(split, input_tokens=split.input_tokens + extra, read_tokens=read)


def _small(request: pb.CompleteRequest) -> bool:
    """Whether the request's prompt is cheap enough to compute on the event loop."""
    if request.ByteSize() > INLINE_PROMPT_BYTES:
        return False
    parts = len(request.tools) + len(request.system)
    return parts + sum(len(m.content) for m in request.messages) <= INLINE_PROMPT_PARTS


def _count(value: int, field: str) -> None:
    if not 0 <= value <= MAX_TOKENS:
        raise BadRequest(f"{field} must be between 0 and {MAX_TOKENS:,}, got {value}")


def _require(value: str, field: str) -> None:
    if not value:
        raise BadRequest(f"{field} is required and must not be empty")


def _require_tenant(tenant: str) -> None:
    """A tenant named as the key file names them (``tenant_error``): nothing is warmed,
    recorded or billed under a name no caller can have."""
    _require(tenant, "tenant")
    if error := tenant_error(tenant):
        raise BadRequest(error)


def _no_warm(request_id: str) -> NoWarmCommit:
    return NoWarmCommit(
        f"no WARM commit for request_id {shown(request_id)} of this tenant (never made, or "
        "expired): commit phase WARM with the request before FINAL"
    )
