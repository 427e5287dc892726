"""The router's calls to its dependencies, each with its deadline and its way to degrade.

Lookup, Plan and Commit return ``None`` when their service cannot be reached (the request
goes on, degraded, and the span records why); an ``INVALID_ARGUMENT`` or
``RESOURCE_EXHAUSTED`` from a dependency is the request's fault and reaches the client.

A request's calls to prefix-cache (Plan, WARM, FINAL) share a ``PrefixWindow``: each waits at
most ``ROUTER_PREFIX_TIMEOUT_S`` and half of what the request's deadline leaves, and once one
has timed out (prefix-cache hung: stopped, or waiting on its Redis) the request makes no other
and goes on as with prefix-cache down. After ``breaker.BREAKER_AFTER`` timeouts in a row, across
requests (of calls not cut short by a client's deadline), no request calls it for
``ROUTER_PREFIX_BREAKER_S``.

A call cut short by its request's own (the client's) deadline, given less than half of the
router's own limit for it (``_BREAKER_MIN_SHARE``), or not made because that deadline left no
time (or an earlier call of the request was so cut), is no fault of the dependency: it counts
as ``CLIENT_DEADLINE``, not its status, at DEBUG, and toward no breaker (a soak of 300 calls
with a 30 ms deadline counted 92 prefix-cache degradations and fired their alert).

semantic-cache has a breaker of its own, by the same rule: after ``breaker.BREAKER_AFTER``
first Lookups in a row timed out (each given at least half of ``ROUTER_SEMANTIC_TIMEOUT_S``;
a request counts once), no Lookup is sent for ``ROUTER_SEMANTIC_BREAKER_S`` (the request goes
on as with L1 down; the skip is a degradation), then one request tries it: for every tenant
when no other tenant's Lookup was answered while those waited (a hang), else for their tenant
alone (its own backlog in L1: ``l1_breaker.SemanticBreakers``). Until a Lookup
answers again, a Store without a lease is not sent either (it would wait
``ROUTER_SEMANTIC_STORE_TIMEOUT_S`` in the background for each answer, and hold up a drain: a
lost future hit); a leader's Store, Releases and lease renewals are, as before (their leases
were taken before L1 hung, and identical requests wait on them: skipped, those would wait
until the lease's age limit once L1 is back).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, prefix_cache_pb2, semantic_cache_pb2
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.clock import SecondsClock, Throttles, suppressed
from services.common.errors import Code, RequestError
from services.common.span_events import record_event
from services.router.breaker import Dependency, prefix_breaker
from services.router.dependencies import (
    CLIENT_DEADLINE,
    CallFailed,
    CutByClient,
    Dependencies,
    ModelStream,
    without_refused_report,
)
from services.router.l1_breaker import SemanticBreakers
from services.router.model_facts import ModelScopes
from services.router.renewals import Renewals
from services.router.settings import RouterSettings

log = logging.getLogger("cachemesh.router")

T = TypeVar("T")

CLIENT_FAULTS = (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED)
# The first Lookup takes at most this share of what the request's deadline leaves (and at most
# ROUTER_SEMANTIC_TIMEOUT_S): a slow L1 degrades to the model within a short client deadline
# instead of using it all up.
_LOOKUP_SHARE = 0.5
# The second Lookup (waiting on an identical request's model call) takes at most this share of
# what the request's deadline leaves: the rest is kept for the request's own model call, should
# that call's answer not come (its router died, or its model is as slow as the deadline).
_LEASE_WAIT_SHARE = 0.5
# Each prefix-cache call of a request (Plan, WARM, FINAL) takes at most this share of what the
# request's deadline leaves (and at most ROUTER_PREFIX_TIMEOUT_S): a hung prefix-cache leaves the
# model call, or the answer's reply, the other half.
_PREFIX_SHARE = 0.5
# prefix-cache calls (or first Lookups) timed out in a row (across requests, ``BREAKER_AFTER``)
# make none for ROUTER_PREFIX_BREAKER_S (ROUTER_SEMANTIC_BREAKER_S); only calls given at least
# this share of ROUTER_PREFIX_TIMEOUT_S (ROUTER_SEMANTIC_TIMEOUT_S) count (one cut short by its
# own client's short deadline says little about the dependency)
_BREAKER_MIN_SHARE = 0.5
# why a Lookup, or a Store without a lease, is not sent (``Calls._l1``)
L1_LEFT_ALONE = "Lookups timed out in a row (ROUTER_SEMANTIC_BREAKER_S)"
L1_NOT_BACK = (
    "Lookups timed out in a row and no Lookup has answered since (ROUTER_SEMANTIC_BREAKER_S)"
)
# A Lookup that failed so: L1 may have taken the lease, its reply (and the lease_id) lost on
# the way (the deadline passed as it came, the request was cancelled, the connection broke)
_REPLY_MAY_BE_LOST = frozenset({Code.DEADLINE_EXCEEDED, Code.CANCELLED, Code.UNAVAILABLE})
# the semantic modes whose Lookup may take the lease (REFRESH, NO_STORE, BYPASS never do)
_LEADING_MODES = frozenset({pb.SEMANTIC_MODE_UNSPECIFIED, pb.SEMANTIC_MODE_USE})
# a dependency's failed calls logged at most one line this often for each status code (the
# first at once): a dependency down at 100 requests a second was 100 WARNING lines a second
DEGRADED_LOG_EVERY_MS = 10_000


def _capped(limit_s: float, deadline: float | None, share: float, now: float) -> float:
    """A call's deadline: ``limit_s``, and at most ``share`` of what ``deadline`` leaves at
    ``now`` (None: the client set no deadline)."""
    if deadline is None:
        return limit_s
    return min(limit_s, (deadline - now) * share)


@dataclass
class PrefixWindow:
    """One request's calls to prefix-cache. ``deadline``: when the request's model call must
    end, on the calls' clock (None: no client deadline, or a bill after the caller left);
    ``off``: one of them timed out or was not made, so the rest of the request makes none (no
    Plan: it goes on as with prefix-cache down; WARM and FINAL: to the billing outbox; a FINAL
    sent without its WARM would only be refused; the bill of a call that ended early, made
    after it, and a whole answer's, get a window of their own, without the request's deadline,
    unless prefix-cache's own fault turned this one off: ``billing.Billing._billing_window``,
    ``_bill_answer``)."""

    deadline: float | None = None
    off: bool = False
    # a timeout of this request's has counted toward the breaker: a request (its Plans of
    # every tier at once) counts once, so that one request cannot leave prefix-cache alone
    # for every tenant
    counted: bool = False
    # ``off`` because the request's own deadline cut a call short or left it no time: the
    # calls skipped since are no prefix-cache fault either (``CLIENT_DEADLINE``)
    clients: bool = False

    def turned_off(self, clients: bool) -> None:
        """No more calls for this request; the first reason stands."""
        if not self.off:
            self.off, self.clients = True, clients


def _uncounted_tenant() -> None:
    pass


def _uncounted(dependency: Dependency) -> None:
    pass


def _cut_by_client(exc: CallFailed, short: bool) -> CallFailed:
    """``exc`` as ``CutByClient`` when it is a timeout of a call its client's deadline left
    ``short`` (under half of the router's own limit for it)."""
    if short and exc.code == Code.DEADLINE_EXCEEDED:
        return CutByClient.of(exc)
    return exc


def _client_fault(exc: CallFailed) -> RequestError | None:
    if exc.code in CLIENT_FAULTS:
        return RequestError(exc.code, exc.details)
    return None


# a degraded call's dependency ("semantic-cache") and reason (its gRPC status name)
Degraded = Callable[[str, str], None]


def warm_commit(
    tenant: str,
    commit_id: str,
    model: str,
    replica: str,
    kv_cached_tokens: int,
    max_read_tokens: int | None,
    plan_id: str,
    kv_cached_unreported: bool,
    arrived_ms: int | None = None,
    stalled_warm: Sequence[str] = (),
    engine_instance: str = "",
) -> prefix_cache_pb2.CommitRequest:
    """A call's WARM commit as ``Calls.commit_warm`` first sends it: by its ``plan_id``,
    without the request (``kv_cached_unreported``: the replica could not tell its KV reuse at
    its first token, a provider adapter, so ``kv_cached_tokens`` is no report). Without a Plan
    (no ``max_read_tokens``) it carries ``arrived_ms``, the router's time of the model call:
    prefix-cache judges the read then, so a concurrent request's write since is not read.
    ``stalled_warm``: the replicas the request's call stalled on, predicted warm, before
    this one (``Attempt.stalled_warm``). ``engine_instance``: the run of the replica's engine
    that answered (``GenerateStart.engine_instance``; prefix-cache forgets the replica's view
    when it changes: a restarted engine)."""
    commit = prefix_cache_pb2.CommitRequest(
        tenant=tenant,
        request_id=commit_id,
        phase=prefix_cache_pb2.COMMIT_PHASE_WARM,
        model=model,
        replica=replica,
        kv_cached_tokens=kv_cached_tokens,
        plan_id=plan_id,
        kv_cached_unreported=kv_cached_unreported,
        stalled_warm_replicas=list(stalled_warm),
        replica_instance=engine_instance,
    )
    if max_read_tokens is not None:
        commit.max_read_tokens = max_read_tokens
    elif arrived_ms is not None:
        commit.arrived_at_ms = arrived_ms
    return commit


class Calls:
    def __init__(
        self,
        dependencies: Dependencies,
        settings: RouterSettings,
        counted: Degraded | None = None,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        background: Callable[[Awaitable[None]], object] | None = None,
        hung: Callable[[Dependency], None] | None = None,
        tenant_left_alone: Callable[[], None] | None = None,
        models: ModelScopes | None = None,
    ) -> None:
        """``counted``: the degradations' metric (None: a router built without metrics);
        ``tracer``: for a call that degrades after its request's span ended (a Store);
        ``clock``: seconds, the clock of the requests' deadlines; ``sleep``: waits that many
        seconds on that clock (between a lease's renewals); ``background``: runs a call past
        the request (the Release of a lost Lookup's lease; None: a task of its own);
        ``hung``: told as a hang of prefix-cache or semantic-cache starts, its breaker first
        leaving it alone (the metric; None: not counted); ``tenant_left_alone``: told as L1 is
        first left alone for one tenant's Lookups (the metric; None: not counted);
        ``models``: the model table's facts of each model string, which L1's calls carry so that
        its answers are served only for the model that made them (``ModelScopes``; None: the
        model string alone, as from a router older than them)."""
        self._background = background if background is not None else self._in_background
        self._tasks: set[asyncio.Future[Any]] = set()
        self._d = dependencies
        self._s = settings
        self._models = models
        self._counted = counted
        self._tracer = tracer
        self._clock = clock
        self._sleep = sleep
        told = hung if hung is not None else _uncounted
        self._breaker = prefix_breaker(settings.prefix_breaker_s, clock, told)
        self._l1 = SemanticBreakers(
            settings.semantic_breaker_s,
            clock,
            told,
            tenant_left_alone if tenant_left_alone is not None else _uncounted_tenant,
        )
        self._unavailable = Throttles(SecondsClock(clock), DEGRADED_LOG_EVERY_MS)

    def _degraded(
        self, what: str, exc: CallFailed, *, logged: bool = True, tenant: str = ""
    ) -> None:
        """Each degradation counted and on the span; ``logged`` False: no log line (the caller
        logs). The first failure of ``what`` with its status code is a WARNING line, then one
        a ``DEGRADED_LOG_EVERY_MS`` saying how many were not logged; a timeout while the
        dependency's breaker has left it alone (its trials; semantic-cache's for ``tenant``,
        or for every tenant) is DEBUG: the breaker's WARNING said so. A call its client's
        deadline cut short (``CutByClient``) is DEBUG and counts as ``CLIENT_DEADLINE``: no
        fault of ``what``."""
        clients = isinstance(exc, CutByClient)
        if clients:
            log.debug(
                "%s call cut short by the request's own deadline (%s); going on without it",
                what,
                exc.code.name,
            )
        elif logged:
            self._log_degraded(what, exc, tenant)
        attributes: dict[str, str | bool] = {"dependency": what, "grpc.status": exc.code.name}
        if clients:
            attributes["cachemesh.client_deadline"] = True
        record_event(self._tracer, "cachemesh.degraded", attributes)
        if self._counted is not None:
            self._counted(what, CLIENT_DEADLINE if clients else exc.code.name)

    def _log_degraded(self, what: str, exc: CallFailed, tenant: str) -> None:
        tripped = self._breaker.tripped if what == "prefix-cache" else self._l1.tripped(tenant)
        if exc.code == Code.DEADLINE_EXCEEDED and tripped:
            log.debug("%s unavailable (%s: %s); degrading", what, exc.code.name, exc.details)
            return
        due = self._unavailable.due(what, exc.code.name)
        if due:
            more = suppressed(due, DEGRADED_LOG_EVERY_MS)
            log.warning(
                "%s unavailable (%s: %s); degrading%s", what, exc.code.name, exc.details, more
            )

    def _not_made(self, what: str, why: str, *, clients: bool = False) -> None:
        """A call to ``what`` not made (``why``): a degradation as a timeout is (the metric and
        its alert count it as one), its span event saying why it was not even tried;
        ``clients``: for the request's own deadline, ``CLIENT_DEADLINE``, no fault of
        ``what``."""
        log.debug("%s call skipped: %s", what, why)
        attributes: dict[str, str | bool] = {
            "dependency": what,
            "grpc.status": Code.DEADLINE_EXCEEDED.name,
            "cachemesh.skipped": why,
        }
        if clients:
            attributes["cachemesh.client_deadline"] = True
        record_event(self._tracer, "cachemesh.degraded", attributes)
        if self._counted is not None:
            self._counted(what, CLIENT_DEADLINE if clients else Code.DEADLINE_EXCEEDED.name)

    async def _degrading(
        self, what: str, call: Awaitable[T], *, client_faults: bool = True
    ) -> T | None:
        """The call's reply, or None when ``what`` cannot serve it (the request goes on
        degraded); with ``client_faults`` a refusal that is the request's fault reaches the
        client."""
        try:
            return await call
        except CallFailed as exc:
            if client_faults and (fault := _client_fault(exc)) is not None:
                raise fault from exc
            self._degraded(what, exc)
            return None

    async def lookup(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        *,
        want_embedding: bool = False,
        deadline: float | None = None,
        accepted_tiers: Sequence[str] = (),
        retry: bool = False,
    ) -> semantic_cache_pb2.LookupResponse | None:
        """L1's answer; when an identical request's model call is in flight (``pending``) and
        outlasted the lookup's deadline, one more lookup waits for it (``lease_wait_s``), so
        concurrent identical misses share one model call. ``deadline``: when the request's
        model call must end, on ``clock`` (None: the client set no deadline).
        ``accepted_tiers``: the answer tiers the request accepts (empty: any). ``retry``: the
        call was marked as a possible retry, so it may take over the lease its request_id
        holds (its first call's router died); any other waits on that lease."""
        lookup_s = self.lookup_timeout_s(deadline)
        if lookup_s <= 0:
            return None  # the deadline has passed: nothing to wait for
        if self._l1.open(tenant):
            self._not_made("semantic-cache", L1_LEFT_ALONE)
            return None
        # each Lookup names the lease it may take, so that one whose reply is lost can be
        # released all the same (``_lookup``)
        call = semantic_cache_pb2.LookupRequest(
            tenant=tenant,
            request=request,
            want_embedding=want_embedding,
            accepted_tiers=accepted_tiers,
            lease_id=uuid.uuid4().hex,
            retry=retry,
            model_facts=self._facts(request),
        )
        if self._models is not None:
            call.accepted_models.extend(self._models.accepted_models(request.model))
        # its timeout counts toward leaving L1 alone unless the client's deadline cut it short
        # (then it is no degradation of L1 either)
        counts = lookup_s >= self._s.semantic_timeout_s * _BREAKER_MIN_SHARE
        first = await self._lookup(call, lookup_s, counts=counts, short=not counts)
        if first is None or not first.pending:
            return first
        wait_s = self.lease_wait_s(deadline)
        if wait_s <= 0:
            return first  # no time to wait: the request calls the model itself
        trace.get_current_span().add_event("cachemesh.semantic.await_lease")
        call.lease_id = uuid.uuid4().hex  # a lease of its own: never the first Lookup's id
        short = wait_s < self._s.semantic_lease_wait_s * _BREAKER_MIN_SHARE
        second = await self._lookup(call, wait_s, short=short)
        return first if second is None else second

    def _facts(self, request: pb.CompleteRequest) -> semantic_cache_pb2.ModelFacts | None:
        """What L1's scope holds of the request's model beyond its string (None: nothing)."""
        return None if self._models is None else self._models.facts(request.model)

    def lookup_timeout_s(self, deadline: float | None) -> float:
        """The first Lookup's deadline: ``ROUTER_SEMANTIC_TIMEOUT_S``, and at most half of what
        ``deadline`` leaves now, so that a slow L1 leaves the model call the other half."""
        return _capped(self._s.semantic_timeout_s, deadline, _LOOKUP_SHARE, self._clock())

    def lease_wait_s(self, deadline: float | None) -> float:
        """The second Lookup's deadline: ``ROUTER_SEMANTIC_LEASE_WAIT_S``, and at most half of
        what ``deadline`` leaves now, so that a wait that ends without the answer still leaves
        the request's own model call the other half (<= 0: no wait)."""
        wait_s = self._s.semantic_lease_wait_s
        if wait_s <= 0:
            return wait_s
        return _capped(wait_s, deadline, _LEASE_WAIT_SHARE, self._clock())

    async def release(self, tenant: str, request: pb.CompleteRequest, lease_id: str) -> None:
        """Ends the lease this request's Lookup took (its model call ended without a Store);
        a lease another request has taken since (after this one's expired) is kept."""
        await self._degrading(
            "semantic-cache",
            self._d.semantic.release(
                semantic_cache_pb2.ReleaseRequest(
                    tenant=tenant,
                    request=request,
                    lease_id=lease_id,
                    model_facts=self._facts(request),
                ),
                self._s.semantic_timeout_s,
            ),
            client_faults=False,  # the request has ended already: nothing to tell its client
        )

    async def keep_lease(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        lookup: semantic_cache_pb2.LookupResponse,
    ) -> None:
        """Renews the lease ``lookup`` took (it said ``leader``) on ``Renewals``' schedule,
        until cancelled: once the request's Store is sent, or its model call ended without
        one (then ``release``). Identical requests keep waiting for this call however long it
        runs, instead of each leading a paid call of its own once the age limit passes. Never
        fails the request (L1 is optional): a renewal that fails is a degradation (each one
        counted; the lease's first one logged), each try bounded by the wait before it; a
        lease given up is logged; a lease found ended or taken by another request is logged,
        and renewed no more. An L1 that gives no ``lease_s`` (older): not renewed, its age
        limit alone."""
        lease_s = lookup.lease_s
        if not lookup.leader or lease_s <= 0:
            return
        # by its lease_id, not the request: this goes every third of the lease while the call
        # runs, and the request may be a megabyte (L1 would parse and hash it each time)
        # with its request_id: L1 renews only a lease this request took, not one another
        # request took under the same id after this one's ended (a late renewal)
        call = semantic_cache_pb2.RenewRequest(
            tenant=tenant, lease_id=lookup.lease_id, request_id=request.request_id
        )
        schedule = Renewals(lease_s, self._clock)  # the lease, just taken
        while True:
            await self._sleep(schedule.wait_s)
            tried = self._clock()  # a renewal counts from its try's start
            try:
                # one slower than the wait before it is as good as lost: the next try goes then
                deadline_s = min(self._s.semantic_timeout_s, schedule.wait_s)
                reply = await self._d.semantic.renew(call, deadline_s)
            except CallFailed as exc:
                again = schedule.failed()
                if schedule.failures == 1:
                    log.warning(
                        "semantic-cache: renewing the lease of tenant %s's request %s failed "
                        "(%s: %s); tried again, less and less often, until shortly before it "
                        "lapses (each failure counted in cachemesh_router_degraded_total, not "
                        "logged)",
                        tenant,
                        request.request_id,
                        exc.code.name,
                        exc.details,
                    )
                self._degraded("semantic-cache", exc, logged=False)
                if not again:
                    log.warning(
                        "semantic-cache: the lease of tenant %s's request %s went %.1f s "
                        "without a renewal (%d tries failed), its %.1f s age limit nearly "
                        "reached: an identical request may call the model once it lapses; "
                        "not renewed any more",
                        tenant,
                        request.request_id,
                        schedule.since_renewed_s(),
                        schedule.failures,
                        schedule.lease_s,
                    )
                    return
                continue
            if not reply.renewed:
                log.info(
                    "semantic-cache: the lease of tenant %s's request %s ended before its "
                    "model call did (an identical request's answer was stored, or it lapsed): "
                    "an identical request may call the model meanwhile",
                    tenant,
                    request.request_id,
                )
                record_event(self._tracer, "cachemesh.semantic.lease_lost", {})
                return
            schedule.renewed(tried, reply.lease_s if reply.lease_s > 0 else None)

    async def _lookup(
        self,
        call: semantic_cache_pb2.LookupRequest,
        deadline_s: float,
        *,
        counts: bool = False,
        short: bool = False,
    ) -> semantic_cache_pb2.LookupResponse | None:
        """L1's reply, or None (degraded). A Lookup whose reply may have been lost on its way
        (``_REPLY_MAY_BE_LOST``, or this request cancelled meanwhile) may have left L1 holding
        a lease for a leader that never learned it led: it would neither renew nor release it,
        and identical requests would wait on it up to its age limit. So its lease is released,
        by the id the Lookup gave it, in the background (``_release_lost``). ``counts``: a
        timeout counts toward leaving L1 alone (a request's first Lookup, given enough time; a
        wait on a lease is no sign of a hung L1); any reply ends a run of them. ``short``: the
        client's deadline cut ``deadline_s`` under half of the router's own limit, so a timeout
        is no degradation of L1 (``CutByClient``)."""
        sent = self._clock()
        try:
            reply = await self._d.semantic.lookup(call, deadline_s)
        except CallFailed as exc:
            if counts and exc.code == Code.DEADLINE_EXCEEDED:
                self._l1.failed(call.tenant, sent)
            if exc.code in _REPLY_MAY_BE_LOST:
                self._release_lost(call)
            if (fault := _client_fault(exc)) is not None:
                raise fault from exc
            self._degraded("semantic-cache", _cut_by_client(exc, short), tenant=call.tenant)
            return None
        except asyncio.CancelledError:
            self._release_lost(call)
            raise
        self._l1.answered(call.tenant)
        return reply

    def _release_lost(self, call: semantic_cache_pb2.LookupRequest) -> None:
        if call.lease_id and call.request.cache.semantic in _LEADING_MODES:
            # by its tenant, lease_id and request_id, as a renewal, not by the request: the
            # Lookup failed most likely because L1 is overloaded, and the request may be a
            # megabyte (ids are fresh uuid4s and unique among L1's live leases; by the
            # request_id, L1 ends only a lease this request took, not one another request
            # took under the id since)
            release = semantic_cache_pb2.ReleaseRequest(
                tenant=call.tenant, lease_id=call.lease_id, request_id=call.request.request_id
            )
            self._background(self._release_unseen(release, call.request.request_id))

    async def _release_unseen(
        self, release: semantic_cache_pb2.ReleaseRequest, request_id: str
    ) -> None:
        """Best effort, never counted nor logged as a degradation (the Lookup's failure was):
        released means L1 had taken the lease for the lost Lookup. An L1 older than a Release
        by id alone releases nothing: the lease then ends at its age limit, as before."""
        try:
            reply = await self._d.semantic.release(release, self._s.semantic_timeout_s)
        except CallFailed as exc:
            log.debug("semantic-cache: releasing a lost Lookup's lease failed (%s)", exc.code.name)
            return
        if reply.released and (due := self._unavailable.due("semantic-cache", "lease-released")):
            log.info(
                "semantic-cache: tenant %s's request %s led, but its Lookup's reply did not "
                "reach the router in time; its lease is released, so identical requests need "
                "not wait on it%s",
                release.tenant,
                request_id,
                suppressed(due, DEGRADED_LOG_EVERY_MS),
            )

    def _in_background(self, call: Awaitable[None]) -> None:
        task = asyncio.ensure_future(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def store(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        answer: semantic_cache_pb2.CachedAnswer,
        lease_id: str = "",
    ) -> semantic_cache_pb2.StoreResponse | None:
        """``lease_id``: the lease this request's Lookup took ("": it did not lead); L1 ends
        that lease only, not one another request took after this one's aged out. Not sent
        without a lease while L1 is left alone (a lost future hit)."""
        if not lease_id and self._l1.tripped(tenant):
            self._not_made("semantic-cache", L1_NOT_BACK)
            return None
        return await self._degrading(
            "semantic-cache",
            self._d.semantic.store(
                semantic_cache_pb2.StoreRequest(
                    tenant=tenant,
                    request=request,
                    answer=answer,
                    lease_id=lease_id,
                    model_facts=self._facts(request),
                ),
                # not the lookup's deadline: the answer does not wait for its Store, which
                # waits for L1's write-ahead log to reach the disk (an fsync)
                self._s.semantic_store_timeout_s,
            ),
            client_faults=False,  # the answer was served: a refused store only loses a hit
        )

    def prefix_timeout_s(self, window: PrefixWindow | None = None) -> float:
        """A prefix-cache call's deadline: ``ROUTER_PREFIX_TIMEOUT_S``, and at most half of what
        the request's deadline leaves now (``window``; None: no deadline); 0 when the call is
        not made (``_skipped``)."""
        if self._skipped(window):
            return 0.0
        return self.prefix_share_s(window)

    def prefix_share_s(self, window: PrefixWindow | None = None) -> float:
        """``prefix_timeout_s`` of a call that is made, without asking whether it is: the
        breaker is not asked, so its half-open trial stays for the call itself (asked before
        the call, ``prefix_timeout_s`` gave the trial to the question, and the call, asking
        again, was skipped)."""
        deadline = window.deadline if window is not None else None
        return _capped(self._s.prefix_timeout_s, deadline, _PREFIX_SHARE, self._clock())

    def prefix_faulted(self, window: PrefixWindow | None) -> bool:
        """Whether prefix-cache's own state skips a call of ``window``'s request: an earlier
        call of it timed out or was skipped for a fault of prefix-cache's (not the request's
        own deadline: ``clients``), or the breaker is open. Asks the breaker without taking
        its half-open trial, which the call this check lets through (``_skipped``) takes."""
        if window is not None and window.off and not window.clients:
            return True
        return self._breaker.skips()

    def _skipped(self, window: PrefixWindow | None) -> str:
        """Why a prefix-cache call is not made ("" = it is)."""
        if window is not None and window.off:
            return "an earlier prefix-cache call of this request timed out or was skipped"
        if self._breaker.open():
            return "calls timed out in a row (ROUTER_PREFIX_BREAKER_S)"
        return ""

    async def _prefix(
        self, send: Callable[[float], Awaitable[T]], window: PrefixWindow | None
    ) -> T | None:
        """``send``'s reply, given the call's deadline (``prefix_timeout_s``); None when the
        call is not made: the request goes on as with prefix-cache down. A call that fails
        raises ``CallFailed``; a skip or a timeout ends the request's prefix-cache calls, and a
        timeout counts toward leaving prefix-cache alone (``breaker.Breaker``) unless the
        request's own deadline cut the call short: then it raises ``CutByClient``, and the
        skips it leads to are the client's too."""
        timeout_s = self.prefix_timeout_s(window)
        if timeout_s <= 0:
            why = self._skipped(window)
            clients = window is not None and window.clients if why else True
            if window is not None:
                window.turned_off(clients)
            self._not_made(
                "prefix-cache", why or "no time left in the request's deadline", clients=clients
            )
            return None
        try:
            reply = await send(timeout_s)
        except CallFailed as exc:
            if exc.code != Code.DEADLINE_EXCEEDED:
                raise
            short = timeout_s < self._s.prefix_timeout_s * _BREAKER_MIN_SHARE
            if window is not None:
                window.turned_off(short)
            counted = window is not None and window.counted
            if not short and not counted:
                self._breaker.failed()
                if window is not None:
                    window.counted = True
            if short:
                raise CutByClient.of(exc) from exc
            raise
        self._breaker.answered()
        return reply

    async def plan(
        self,
        tenant: str,
        model: str,
        request: pb.CompleteRequest,
        replicas: Sequence[str],
        window: PrefixWindow | None = None,
    ) -> prefix_cache_pb2.PlanResponse | None:
        """``window``: the request's prefix-cache calls (None: bounded by
        ``ROUTER_PREFIX_TIMEOUT_S`` alone)."""
        call = prefix_cache_pb2.PlanRequest(
            tenant=tenant, model=model, request=request, replicas=list(replicas)
        )
        return await self._degrading(
            "prefix-cache",
            self._prefix(lambda deadline_s: self._d.prefix.plan(call, deadline_s), window),
        )

    async def commit_warm(
        self,
        warm: prefix_cache_pb2.CommitRequest,
        request: pb.CompleteRequest,
        window: PrefixWindow | None = None,
        planned_at_ms: int | None = None,
    ) -> prefix_cache_pb2.CommitResponse | None:
        """``warm`` (``warm_commit``'s); with the ``plan_id`` of this request's Plan the request
        is not sent again (prefix-cache reuses the prompt it computed), unless that process no
        longer holds it (a restart, or another process made it): then ``request`` goes with
        it, and ``planned_at_ms`` (the Plan's time, with the Plan's read): prefix-cache
        settles the WARM as of the request's arrival, as the provider read it, not against a
        warm state a restart may have lost since (a read billed as a write)."""
        commit = warm
        if warm.plan_id:
            try:
                return await self._prefix(
                    lambda deadline_s: self._d.prefix.commit(warm, deadline_s), window
                )
            except CallFailed as exc:
                # FAILED_PRECONDITION is the plan gone, unless marked as the replica's model
                # table lacking the model (``table_lacks_model``): the request sent again
                # would be refused so too (a prefix-cache from before the mark sends none:
                # sent again, as before)
                if exc.code != Code.FAILED_PRECONDITION or exc.table_lacks_model:
                    self._degraded("prefix-cache", exc)
                    return None
                # the plan is gone (expired, or another prefix-cache process made it): a copy,
                # the caller's WARM stays as it was sent (an open call journals it)
                commit = prefix_cache_pb2.CommitRequest()
                commit.CopyFrom(warm)
                if planned_at_ms is not None and commit.HasField("max_read_tokens"):
                    commit.planned_at_ms = planned_at_ms
        commit.request.CopyFrom(request)
        return await self._commit(commit, window)

    async def commit_final(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        commit_id: str,
        model: str,
        replica: str,
        output_tokens: int,
        kv_cached_tokens: int,
        baseline_model: str,
        provider_usage: prefix_cache_pb2.ProviderUsage | None = None,
        window: PrefixWindow | None = None,
    ) -> prefix_cache_pb2.CommitResponse | None:
        """FINAL; a real provider's ``provider_usage`` is the bill (it reconciles the
        estimate). None when prefix-cache did not take it: a degradation, except a refusal for
        want of its WARM, or of its WARM's model in the replica's table (``_warm_lost``)."""
        commit = prefix_cache_pb2.CommitRequest(
            tenant=tenant,
            request_id=commit_id,
            phase=prefix_cache_pb2.COMMIT_PHASE_FINAL,
            model=model,
            replica=replica,
            output_tokens=output_tokens,
            kv_cached_tokens=kv_cached_tokens,
            baseline_model=baseline_model,
        )
        try:
            if provider_usage is not None:
                commit.provider_usage.CopyFrom(provider_usage)
                try:
                    return await self._prefix(
                        lambda deadline_s: self._d.prefix.commit(commit, deadline_s), window
                    )
                except CallFailed as exc:
                    again = without_refused_report(commit, exc)
                    if again is None:
                        raise
                    commit = again  # a report prefix-cache refuses: billed at its estimate
            sent = commit
            return await self._prefix(
                lambda deadline_s: self._d.prefix.commit(sent, deadline_s), window
            )
        except CallFailed as exc:
            if exc.code == Code.FAILED_PRECONDITION:
                self._warm_lost(commit, exc)
            else:
                self._degraded("prefix-cache", exc)
            return None

    def _warm_lost(self, final: prefix_cache_pb2.CommitRequest, exc: CallFailed) -> None:
        """A FINAL prefix-cache refused FAILED_PRECONDITION: it answered, but no longer holds
        the WARM it took ("no WARM commit": restarted with its state in memory, its Redis
        restarted without persistence or flushed; a FINAL whose WARM it never took is not
        sent: ``billing._unwarmed``), or the replica that got the FINAL has a model table
        lacking the WARM's model or ``baseline_model`` (replicas of two tables on one Redis: a
        rolling deploy; the replay's WARM or FINAL refused there, marked ``table_lacks_model``,
        keeps the bill for a later round, a throttled WARNING naming the model, until one
        reaching a replica with the model bills it). No degradation of prefix-cache (counted
        as one, it made ``CachemeshDependencyDegraded`` page for a dependency that answers):
        not in ``cachemesh_router_degraded_total``; the call is counted as every call is, in
        ``cachemesh_router_dependency_duration_seconds{method="Commit",
        code="FAILED_PRECONDITION"}``, a WARNING (at most one a ``DEGRADED_LOG_EVERY_MS``)
        and its span's ``cachemesh.warm_lost`` event say so, and its bill goes to the billing
        outbox, whose replay sends the WARM again with the request, then the FINAL."""
        due = self._unavailable.due("prefix-cache FINAL", exc.code.name)
        if due:
            log.warning(
                "prefix-cache refused the FINAL of %s (%s: %s): it no longer holds the WARM "
                "commit, or its model table lacks a model the FINAL names (the WARM's, or "
                "baseline_model); its bill goes to the billing outbox, which sends the WARM "
                "again with the request%s",
                final.request_id,
                exc.code.name,
                exc.details,
                suppressed(due, DEGRADED_LOG_EVERY_MS),
            )
        attributes = {"commit": final.request_id, "grpc.status": exc.code.name}
        record_event(self._tracer, "cachemesh.warm_lost", attributes)

    async def _commit(
        self, commit: prefix_cache_pb2.CommitRequest, window: PrefixWindow | None
    ) -> prefix_cache_pb2.CommitResponse | None:
        call = self._prefix(lambda deadline_s: self._d.prefix.commit(commit, deadline_s), window)
        return await self._degrading("prefix-cache", call, client_faults=False)

    def model_timeout_s(self, remaining_s: float | None) -> float:
        """A model call's deadline: ``ROUTER_MODEL_TIMEOUT_S``, or the time the client's
        deadline leaves (``remaining_s``) when that is sooner."""
        if remaining_s is None:
            return self._s.model_timeout_s
        return min(self._s.model_timeout_s, remaining_s)

    async def generate(
        self,
        tenant: str,
        model: str,
        request: pb.CompleteRequest,
        replica: str,
        facts: PromptFacts | None = None,
        timeout_s: float | None = None,
    ) -> tuple[ModelStream, model_pb2.GenerateStart]:
        """Opens the stream and waits for its ``start`` (the prefill is done); a replica
        that fails raises ``CallFailed``, a request it refuses ``RequestError``. ``facts``
        (from Plan) spare the engine tokenizing the prompt again. ``timeout_s``: the call's
        deadline (``model_timeout_s``); the replica gets it as its gRPC deadline and bounds
        its own retries by it."""
        call = model_pb2.GenerateRequest(tenant=tenant, model=model, request=request)
        span = trace.get_current_span()  # the model call's span
        if facts is not None:
            call.prompt.CopyFrom(facts)
            if call.ByteSize() > self._s.server.send_limit:
                # the request and its KV block hashes (2 bytes a token) are over
                # CACHEMESH_MAX_MESSAGE_BYTES together (a prompt of more than a token every
                # 2 bytes near ROUTER_MAX_REQUEST_BYTES): sent, the call failed with gRPC's
                # "Sent message larger than max"; the replica counts the prompt itself
                call.ClearField("prompt")
                span.set_attribute("cachemesh.prompt_facts_left_out", True)
        if timeout_s is None:
            timeout_s = self._s.model_timeout_s
        span.set_attribute("cachemesh.model_deadline_ms", round(timeout_s * 1000))
        stream = self._d.model.generate(replica, call, timeout_s)
        try:
            first = await stream.read()
        except CallFailed as exc:
            if (fault := _client_fault(exc)) is not None:
                raise fault from exc
            raise
        except BaseException:
            stream.cancel()
            raise
        if first is None or first.WhichOneof("part") != "start":
            stream.cancel()
            raise RequestError(Code.UNAVAILABLE, f"a {model} replica sent no start")
        return stream, first.start
