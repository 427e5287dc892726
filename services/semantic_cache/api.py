"""``cachemesh.v1.SemanticCache`` without the transport: messages in, messages out.

The servicer (gRPC) and the offline estimator both call this; a refused request raises
``RequestError`` with its status code, which only the servicer turns into a gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import re
from collections.abc import Callable

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.background import to_the_end
from services.common.clock import Clock, MonotonicClock, Throttles, suppressed
from services.common.errors import Code, RequestError
from services.common.keyfile import same_but_case, tenant_error
from services.common.span_events import record_event
from services.semantic_cache.answers import unparsed_tool_call
from services.semantic_cache.batcher import QueueFull
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.semantic_cache.query import Query, RecentQueries
from services.semantic_cache.records import Answer, CheckResult, InvalidQuery, StoreResult
from services.semantic_cache.tenant_policy import (
    PolicyChange,
    PolicyError,
    PolicyNotDurable,
    TenantPolicies,
)
from services.semantic_cache.tenant_stats import STATS_PAGE_MAX, TenantCounters, stats_page
from services.semantic_cache.wal import NotDurable

log = logging.getLogger("cachemesh.semantic_cache")
DRAINING = "semantic-cache is draining for shutdown: writes are refused; retry elsewhere"
L1_OFF = "L1 is off for this tenant (its cache policy: Admin SetPolicy)"


# A lookup ends this long before its caller's deadline, so its reply (pending) still arrives.
REPLY_MARGIN_S = 0.1
# A Lookup whose embedding is skipped (the queue full, no time left), or whose lease is ended
# because its reply came too late for its caller, is logged at most once in this interval,
# with how many were not: one a Lookup flooded the log while L1 was overloaded, or while a
# caller sent requests with deadlines too short (``..._embed_shed_total`` counts the skips)
EMBED_SKIPPED_LOG_EVERY_MS = 10_000
# A lease id the caller chooses (LookupRequest.lease_id): the router's is uuid4().hex.
_LEASE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def lease_wait_budget_s(lease_wait_s: float, remaining_s: float | None) -> float:
    """The most a lookup waits on an identical request's lease: the configured limit, within
    the caller's deadline less ``REPLY_MARGIN_S`` (None: no deadline). What the check spends
    first (waiting for the scope's Stores, embedding) comes out of it too (``within_s``)."""
    if lease_wait_s <= 0:
        return 0.0
    if remaining_s is None:
        return lease_wait_s
    return max(0.0, min(lease_wait_s, remaining_s - REPLY_MARGIN_S))


class SemanticCacheApi:
    def __init__(
        self,
        cache: SemanticCache,
        lease_wait_s: float = 0.0,
        draining: asyncio.Event | None = None,
        policies: TenantPolicies | None = None,
        metrics: SemanticCacheMetrics | None = None,
        on_drop: Callable[[], None] | None = None,
        log_clock: Clock | None = None,
    ) -> None:
        """``policies``: each tenant's L1 policy (None: in memory, every tenant's L1 on);
        ``on_drop`` hears of each Drop taken, whether or not it counted entries (a snapshot
        soon after it: what had expired is still on the disk until then); ``log_clock``: what
        the throttled log lines' intervals run on (None: the monotonic clock)."""
        self._cache = cache
        self._on_drop = on_drop
        self._metrics = metrics  # None: the offline estimator
        self._lease_wait_s = lease_wait_s  # the most a lookup waits on another's lease
        self._draining = draining  # once set, writes are refused (UNAVAILABLE)
        self._policies = policies if policies is not None else TenantPolicies()
        self._counts = TenantCounters()
        self._queries = RecentQueries()  # a Store reuses its Lookup's query
        self._skipped_log = Throttles(
            log_clock if log_clock is not None else MonotonicClock(), EMBED_SKIPPED_LOG_EVERY_MS
        )

    async def lookup(
        self, request: sc.LookupRequest, remaining_s: float | None, *, wait: bool = True
    ) -> sc.LookupResponse:
        """``remaining_s``: what is left of the caller's deadline (None = no deadline).
        ``wait=False`` (the offline replay, which waits on its virtual clock instead): the
        lookup never waits, on the scope's Stores or on a lease, and what it computes (the
        embedding ``auto`` wants) is bounded by no deadline (``remaining_s`` is not read)."""
        _require_tenant(request.tenant)
        _check_lease_id(request.lease_id)
        # before any await: while this Lookup runs (it may wait on a lease up to
        # SEMANTIC_CACHE_LEASE_WAIT_S), its caller may release by the id it proposed (its reply
        # lost), which must end no lease another request holds under that id, live now or
        # taken before this Lookup ends (``Leases.proposing``). Marked only at the Lookup's end
        # before, a Release during its wait ended that lease
        with self._cache.lease_id_proposed(
            request.tenant, request.lease_id, request.request.request_id
        ):
            return await self._lookup(request, remaining_s, wait)

    async def _lookup(
        self, request: sc.LookupRequest, remaining_s: float | None, wait: bool
    ) -> sc.LookupResponse:
        draining = self._is_draining()
        query = await self._query(request.tenant, request.request, _facts(request))
        if request.accepted_tiers:  # a hit of another tier is refused by the check: a miss
            query = dataclasses.replace(query, accepted_tiers=tuple(request.accepted_tiers))
        if request.accepted_models:  # so is one another row made (``auto`` repointed)
            query = dataclasses.replace(query, accepted_models=tuple(request.accepted_models))
        # the whole lookup (its wait for the scope's Stores, the lease wait, the embedding
        # ``auto`` wants) ends in time for its reply
        within_s = None
        if wait and remaining_s is not None:
            within_s = max(0.0, remaining_s - REPLY_MARGIN_S)
        deadline = self._cache.deadline_in(within_s)
        if not self._policies.get(request.tenant).l1_enabled:
            # no read; for the router's tier choice, still the embedding when it is wanted
            skipped = sc.LookupResponse(skip_reason=L1_OFF)
            if request.want_embedding:
                await self._embedding_into(skipped, query, deadline)
            return skipped
        # a draining cache refuses Stores, so it leads no model call and makes none wait
        wait_s = 0.0 if draining else max(0.0, self._lease_wait_s)
        try:
            result = await self._cache.check(
                query,
                wait_s,
                lead=not draining,
                within_s=within_s,
                waits=wait,
                lease_id=request.lease_id,
                retry=request.retry,
            )
        except InvalidQuery as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
        try:
            return await self._looked_up(request, query, result, deadline)
        except BaseException:  # cancelled (the caller's deadline passed, or it went away),
            # or failed: the caller never learns it leads, so it would neither renew nor
            # release the lease
            if result.leader:
                self.abandon(request.tenant, result.lease_id, request.request.request_id)
            raise

    def abandon(self, tenant: str, lease_id: str, request_id: str) -> bool:
        """Ends the lease a leading Lookup of the request ``request_id`` took whose reply did
        not reach its caller (it was cancelled, or replied past its deadline): that caller
        makes the model call as if it had not looked up, and neither renews nor releases a
        lease it does not know it holds, so the identical requests would wait on it up to its
        age limit. Only that lease: by its id, whether another request proposed the id too or
        not, and only if that request took it. Its reply is built after the take (its
        embedding awaited): the lease may have ended meanwhile (its age limit) and another
        request's Lookup taken one under the same id, which was ended. True when it was held."""
        ended = self._cache.end_lease(tenant, lease_id, owner=request_id)
        if ended and (due := self._skipped_log.due("lease", "abandoned")):
            log.info(
                "lookup for tenant %s: its reply did not reach the caller in time; the lease "
                "it took is ended, so identical requests need not wait on it%s",
                tenant,
                suppressed(due, EMBED_SKIPPED_LOG_EVERY_MS),
            )
        return ended

    async def _looked_up(
        self,
        request: sc.LookupRequest,
        query: Query,
        result: CheckResult,
        deadline: float | None,
    ) -> sc.LookupResponse:
        if self._metrics is not None:
            self._metrics.looked_up(request.tenant, result)
        log.debug(
            "lookup for tenant %s: %s, best similarity %.3f",
            request.tenant,
            "hit" if result.hit else "skipped" if result.skip_reason else "miss",
            result.best_similarity,
        )
        response = sc.LookupResponse(
            pending=result.pending,
            hit=result.hit,
            best_similarity=result.best_similarity,
            skip_reason=result.skip_reason,
            leader=result.leader,
            lease_id=result.lease_id,
            lease_s=self._cache.lease_s if result.leader else 0.0,
            waited=result.waited,
            refusal=result.refusal,
        )
        if not result.skip_reason:
            self._counts.looked_up(request.tenant, hit=result.hit, exact=result.exact)
        if request.want_embedding and not result.hit:
            # the vector the check computed (or, with no check, this one): the Store reuses it
            await self._embedding_into(response, query, deadline)
        if result.entry is not None:
            response.match.CopyFrom(
                pb.SemanticMatch(
                    similarity=result.similarity,
                    entry_id=result.entry.entry_id,
                    exact=result.exact,
                )
            )
            response.answer.ParseFromString(result.entry.answer.payload)
        return response

    async def store(self, request: sc.StoreRequest) -> sc.StoreResponse:
        _require_tenant(request.tenant)
        # None: a router older than the field, or a request that did not lead: ends the key's
        # lease only if this request took it (``SemanticCache.release``)
        lease_id = request.lease_id or None
        if self._is_draining():
            with contextlib.suppress(InvalidQuery):  # a refused Store still ends its lease
                self._cache.release(
                    self._queries.of(request.tenant, request.request, _facts(request)), lease_id
                )
            raise RequestError(Code.UNAVAILABLE, DRAINING)
        query = await self._lease_query(request, lease_id)
        answer = request.answer
        if answer.output_tokens < 0:
            self._cache.release(query, lease_id)  # a refused Store still ends its lease
            raise RequestError(Code.INVALID_ARGUMENT, "answer.output_tokens must be >= 0")
        record = Answer(
            payload=answer.SerializeToString(deterministic=True),
            stop_reason=answer.stop_reason,
            output_tokens=answer.output_tokens,
            has_tool_use=any(b.WhichOneof("kind") == "tool_use" for b in answer.content),
            has_text=any(b.WhichOneof("kind") == "text" and b.text.strip() for b in answer.content),
            unparsed_tool_call=unparsed_tool_call(answer.content),
        )
        policy = self._policies.get(request.tenant)
        if not policy.l1_enabled:
            self._cache.release(query, lease_id)
            return sc.StoreResponse(stored=False, skip_reason=L1_OFF)
        try:
            result = await self._cache.store(query, record, policy.default_ttl_s, lease_id)
        except InvalidQuery as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except QueueFull as exc:  # L1 is busy: this answer is not kept (a later one may be)
            result = StoreResult(False, skip_reason=str(exc))
        except NotDurable as exc:  # not stored: never served, nor after a restart
            self._refused("store")
            raise RequestError(Code.UNAVAILABLE, exc.reason) from exc
        if result.stored:
            self._counts.stored(request.tenant)
        if self._metrics is not None:
            self._metrics.stored(request.tenant, result.stored)
        log.debug(
            "store for tenant %s: %s", request.tenant, "stored" if result.stored else "skipped"
        )
        return sc.StoreResponse(
            stored=result.stored, entry_id=result.entry_id, skip_reason=result.skip_reason
        )

    async def drop(self, request: sc.DropRequest) -> sc.DropResponse:
        if self._is_draining():
            raise RequestError(Code.UNAVAILABLE, DRAINING)
        _require_tenant(request.tenant)
        try:  # durable before it is applied and acknowledged
            if request.entry_id:
                dropped = await self._cache.drop_entry(request.tenant, request.entry_id)
            else:
                namespace = request.namespace if request.HasField("namespace") else None
                dropped = await self._cache.drop(request.tenant, namespace)
        except NotDurable as exc:  # nothing removed: the entries are still served, say so
            self._refused("drop")
            raise RequestError(Code.UNAVAILABLE, exc.reason) from exc
        if self._on_drop is not None:
            # after every Drop taken, whatever it counted: entries already expired (not yet
            # collected) count 0 but their text is still in the log and the snapshot; a save
            # that finds nothing changed writes nothing
            self._on_drop()  # their text leaves the disk at the next snapshot: soon
        return sc.DropResponse(dropped=dropped)

    async def release(self, request: sc.ReleaseRequest) -> sc.ReleaseResponse:
        _require_tenant(request.tenant)
        if not request.HasField("request"):  # by its id and request_id (a lost Lookup's lease)
            if not request.lease_id:
                raise RequestError(
                    Code.INVALID_ARGUMENT,
                    "name the lease to release: lease_id, or the request whose Lookup led",
                )
            # with its request_id, only a lease that request took; without (an older router),
            # any lease by that id but a contested one
            owner = request.request_id or None
            return sc.ReleaseResponse(
                released=self._cache.end_lease(request.tenant, request.lease_id, owner=owner)
            )
        lease_id = request.lease_id or None
        query = await self._lease_query(request, lease_id)
        return sc.ReleaseResponse(released=self._cache.release(query, lease_id))

    async def renew(self, request: sc.RenewRequest) -> sc.RenewResponse:
        """The lease of a leader whose model call is still on, held on (``renewed``), or not
        held any more (not an error). Also while draining: the lookups already waiting on it
        keep waiting for that call (a draining cache makes no new one wait). Named by its
        tenant, lease_id and request_id only: nothing of the request is parsed, hashed or
        derived again. With a request_id, only a lease that request took is renewed; without
        (an older router), any by that id."""
        _require_tenant(request.tenant)
        owner = request.request_id or None
        if not self._cache.renew(request.tenant, request.lease_id, owner):
            return sc.RenewResponse(renewed=False)
        return sc.RenewResponse(renewed=True, lease_s=self._cache.lease_s)

    def stats(self, request: sc.L1StatsRequest) -> sc.L1StatsResponse:
        """One tenant's row; without one, a page of tenants (page_size > 0), or every tenant's
        (0: a router older than pages; its reply passes gRPC's 4 MiB limit at ~57,000
        tenants)."""
        sizes = self._cache.tenant_sizes()
        response = sc.L1StatsResponse()
        if request.tenant:  # refused as every other call refuses it: its row echoed it back
            _require_tenant(request.tenant)
            tenants = [request.tenant]
            held = (sizes, self._counts.tenants(), self._policies.tenants())
            response.known = any(request.tenant in names for names in held)
            if not response.known:
                twin = same_but_case(request.tenant, itertools.chain.from_iterable(held))
                if twin is not None:
                    response.known_as = twin
        elif request.page_size < 0:
            raise RequestError(
                Code.INVALID_ARGUMENT,
                f"page_size: must be 0 (every tenant) or 1 to {STATS_PAGE_MAX:,} (a page), got "
                f"{request.page_size}",
            )
        else:
            known = set(sizes) | self._counts.tenants() | self._policies.tenants()
            if request.page_size == 0:
                tenants = sorted(known)
            else:
                size = min(request.page_size, STATS_PAGE_MAX)
                tenants, response.more = stats_page(known, request.after, size)
                response.paged = True
        for tenant in tenants:
            entries, namespaces = sizes.get(tenant, (0, 0))
            counts = self._counts.get(tenant)
            response.tenants.add(
                tenant=tenant,
                entries=entries,
                namespaces=namespaces,
                lookups=counts.lookups,
                hits=counts.hits,
                exact_hits=counts.exact_hits,
                stores=counts.stores,
                l1_enabled=self._policies.get(tenant).l1_enabled,
            )
        return response

    async def get_policy(self, request: sc.L1PolicyRequest) -> sc.L1Policy:
        _require_tenant(request.tenant)
        return self._policy_message(request.tenant)

    async def set_policy(self, request: sc.SetL1PolicyRequest) -> sc.L1Policy:
        _require_tenant(request.tenant)
        if self._is_draining():
            raise RequestError(Code.UNAVAILABLE, DRAINING)
        change = PolicyChange(
            l1_enabled=request.l1_enabled if request.HasField("l1_enabled") else None,
            default_ttl_s=request.default_ttl_s if request.HasField("default_ttl_s") else None,
            reset_default_ttl=request.reset_default_ttl,
        )

        async def change_policy() -> None:
            await self._policies.set(request.tenant, change)
            if change.l1_enabled is False:  # a Store already on its way stores nothing either
                self._cache.stop_pending_stores(request.tenant)

        try:  # to its end once begun: the file, once written, is followed here too
            await to_the_end(change_policy(), said=(PolicyError, PolicyNotDurable))
        except PolicyError as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except PolicyNotDurable as exc:  # a full disk: not applied, the caller retries
            self._refused("policy")
            raise RequestError(Code.UNAVAILABLE, exc.reason) from exc
        return self._policy_message(request.tenant)

    def _refused(self, write: str) -> None:
        """A write that could not be made durable was refused (the metric)."""
        if self._metrics is not None:
            self._metrics.write_refused(write)

    def _policy_message(self, tenant: str) -> sc.L1Policy:
        policy = self._policies.get(tenant)
        message = sc.L1Policy(
            tenant=tenant,
            l1_enabled=policy.l1_enabled,
            effective_default_ttl_s=(
                policy.default_ttl_s
                if policy.default_ttl_s is not None
                else self._cache.default_ttl_s
            ),
        )
        if policy.default_ttl_s is not None:
            message.default_ttl_s = policy.default_ttl_s
        return message

    async def _embedding_into(
        self, response: sc.LookupResponse, query: Query, deadline: float | None
    ) -> None:
        """The last user turn's embedding (none without user text), and the embedder's
        version; none either when it would not come before ``deadline`` (the reply would be
        late: the router would count L1 as down and lose the answer's ``pending``/``leader``;
        without the vector it embeds the question itself or scores its shape)."""
        if not (query.text and query.normalised):
            return
        try:
            vector = await self._cache.embedding(query.tenant, query.text, deadline)
        except QueueFull:
            if due := self._skipped_log.due("embedding", "busy"):
                log.info(
                    "lookup for tenant %s: the embedding queue is full%s",
                    query.tenant,
                    suppressed(due, EMBED_SKIPPED_LOG_EVERY_MS),
                )
            record_event(None, "cachemesh.semantic.embedding_skipped", {"reason": "busy"})
            return
        if vector is None:
            if due := self._skipped_log.due("embedding", "deadline"):
                log.info(
                    "lookup for tenant %s: no time left to embed the question%s",
                    query.tenant,
                    suppressed(due, EMBED_SKIPPED_LOG_EVERY_MS),
                )
            record_event(None, "cachemesh.semantic.embedding_skipped", {"reason": "deadline"})
            return
        response.embedding = vector.astype("<f4").tobytes()
        response.embedder_version = self._cache.embedder_version

    def _is_draining(self) -> bool:
        return self._draining is not None and self._draining.is_set()

    async def _lease_query(
        self, request: sc.StoreRequest | sc.ReleaseRequest, lease_id: str | None
    ) -> Query:
        """The query of a Store or Release, which ends the lease it names (``lease_id``). One
        cancelled while its query is derived (a large request's waits for a worker thread;
        the router's deadline passed meanwhile) or refused there ends that lease all the same,
        by its id (no query to key it by): the router renews it no more once it sends its
        Store or Release, so its identical requests waited on it up to its age limit."""
        try:
            return await self._query(request.tenant, request.request, _facts(request))
        except BaseException:
            if lease_id is not None:  # its own request's lease only (by its request_id)
                owner = request.request.request_id or None  # None: by id, not a contested one
                self._cache.end_lease(request.tenant, lease_id, owner=owner)
            raise

    async def _query(
        self, tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None
    ) -> Query:
        try:
            return await self._queries.derived(tenant, request, facts)
        except InvalidQuery as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc


def _facts(request: sc.LookupRequest | sc.StoreRequest | sc.ReleaseRequest) -> sc.ModelFacts | None:
    """The router's model facts of the request (None: a router older than them sent none)."""
    return request.model_facts if request.HasField("model_facts") else None


def _require_tenant(tenant: str) -> None:
    """A tenant named as the key file names them (``tenant_error``): no entry, lease, count
    or policy is kept under a name no caller can have."""
    if not tenant:
        raise RequestError(
            Code.INVALID_ARGUMENT, "tenant is required: the router must pass the caller's tenant"
        )
    if error := tenant_error(tenant):
        raise RequestError(Code.INVALID_ARGUMENT, error)


def _check_lease_id(lease_id: str) -> None:
    """The id a Lookup asks its lease to have: empty (L1 chooses), or a short token."""
    if lease_id and not _LEASE_ID.fullmatch(lease_id):
        raise RequestError(
            Code.INVALID_ARGUMENT,
            f"lease_id ({len(lease_id)} characters) must be 1 to 64 characters of A-Z, a-z, "
            "0-9, '_' and '-': send a fresh random id per Lookup (uuid4().hex), or none to "
            "let the semantic cache choose it",
        )
