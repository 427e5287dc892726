"""The L1 cache logic: check and store (a small explicit API, RedisVL-style).

A check finds the query's scope, takes the exact-match path (the same text, or the same up to
case and spacing that cannot change its meaning: ``query.folded``) or embeds the text and lets
``matching`` decide among the scope's nearest entries (threshold, verifier, ambiguity; the
verifier runs in a worker thread, and only an entry still there unchanged afterwards is served);
a miss may take the query's single-flight lease. A store embeds the text, then logs the entry
in a synchronous section (``EntryStore``), so no two coroutines interleave inside one; with a
write-ahead log it is inserted once its record is durable, and the store returns then: what a
store acknowledges is visible to the next check and survives a crash, and what the log could
not make durable (a full disk) is refused and never served.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import Clock
from services.common.errors import shown
from services.semantic_cache.batcher import MicroBatcher, QueueFull
from services.semantic_cache.embedder import Embedder
from services.semantic_cache.entries import PURGE_GUARD_MS, EntryStore
from services.semantic_cache.folding import folding_refusal
from services.semantic_cache.index import AnnSettings, ScopeIndex, folded_key
from services.semantic_cache.inflight import StoresInFlight
from services.semantic_cache.leases import LeaseKey, Leases, wait
from services.semantic_cache.matching import Candidate, decide, shortlist
from services.semantic_cache.policy import TTL_RANGE, NamespacePolicy, valid_ttl
from services.semantic_cache.query import SCOPE_VERSION, Query
from services.semantic_cache.recent import TenantRecent
from services.semantic_cache.records import (
    END_TURN,
    MAX_TOKENS,
    TOOL_USE,
    Answer,
    CheckResult,
    Entry,
    InvalidQuery,
    StoreResult,
)
from services.semantic_cache.stats import StoreStats
from services.semantic_cache.verifier import Verifier
from services.semantic_cache.wal import WalError

log = logging.getLogger("cachemesh.semantic_cache")

_RECENT_VECTORS = 1024  # about 1.5 MB of 384-d float32 vectors, all tenants' (shared fairly) ...
_RECENT_TEXT_CHARS = 16 * 1024  # ... at most 16 MB of texts key them (a longer one: its hash)
# The longest question (normalised last user turn) stored: the embedding reads 256 tokens
# (~1k characters), and an entry keeps the whole text (100k entries of 1 MiB would be 100 GB).
MAX_STORED_QUESTION_CHARS = 16 * 1024
# The largest answer stored (its serialized CachedAnswer). Its log record holds it in base64
# (4/3) beside the question (JSON-escaped, up to 12 bytes a character): about 11 MiB at most,
# well under the log's 64 MiB record limit. Twice gRPC's default message limit (4 MiB), so
# only a deployment that raised CACHEMESH_MAX_MESSAGE_BYTES sends larger ones.
MAX_STORED_ANSWER_BYTES = 8 * 1024 * 1024
# Lookups that missed, for their Stores (a model call's worth of traffic), all tenants' together
# and shared fairly: another tenant's misses never push one out (``TenantRecent``).
_MISSES_KEPT = 4096
# The longest a check waits for its scope's Stores in flight (an embedding and a log sync).
_STORE_WAIT_S = 1.0


def _clamp(similarity: float) -> float:
    return min(1.0, max(0.0, similarity))


class SemanticCache(EntryStore):
    def __init__(
        self,
        embedder: Embedder,
        clock: Clock,
        *,
        threshold: float = 0.88,
        ttl_s: float = 86_400.0,
        max_entries: int = 100_000,
        max_bytes: int | None = None,
        top_k: int = 8,
        verifier: Verifier | None = None,
        margin: float = 0.0,
        policy: NamespacePolicy | None = None,
        leases: Leases | None = None,
        batcher: MicroBatcher | None = None,
        ann: AnnSettings | None = None,
        stats: StoreStats | None = None,
        on_lease_wait: Callable[[float, bool], None] | None = None,
        deadline_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``policy`` (per-namespace TTLs and store rules) wins over ``ttl_s`` when given.
        ``stats`` counts what is held and removed; ``on_lease_wait(seconds, served)`` hears of
        each wait on an identical request's lease (both for the metrics). ``deadline_clock``:
        seconds, monotonic, for the callers' deadlines (a step of the wall clock must not
        stretch a wait past one)."""
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        if not valid_ttl(ttl_s):
            raise ValueError(f"ttl_s must be {TTL_RANGE}, got {ttl_s}")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        if not (math.isfinite(margin) and 0.0 <= margin <= 1.0):
            raise ValueError(f"margin must be within [0, 1], got {margin}")
        policy = policy if policy is not None else NamespacePolicy(ttl_s=ttl_s)
        super().__init__(embedder, clock, max_entries, policy, ann, stats, max_bytes)
        self._on_lease_wait = on_lease_wait
        self._deadline_clock = deadline_clock
        self._threshold = threshold
        self._top_k = top_k
        self._verifier = verifier
        self._margin = margin
        self._leases = leases
        self._batcher = batcher  # None = one embedding call per text
        # A miss's Store follows its Lookup: the vector of a recent text is embedded once. By
        # tenant: another tenant's question must not make this one's answer measurably faster,
        # and the bound is shared fairly: another tenant's flood of questions never pushes
        # this one's vectors out (its Stores would embed them again).
        self._recent: TenantRecent[str, npt.NDArray[np.float32]] = TenantRecent(_RECENT_VECTORS)
        # The tenant's purge count when a request's lookup missed, by tenant and request_id:
        # its Store is refused if the tenant purged its entries since (the answer predates it).
        self._missed_at: TenantRecent[str, int] = TenantRecent(_MISSES_KEPT)
        self._storing = StoresInFlight()
        # entry id -> its drop (``_drop_refused``) while it is being logged
        self._dropping: dict[str, asyncio.Task[None]] = {}

    async def check(
        self,
        query: Query,
        wait_s: float = 0.0,
        *,
        lead: bool = True,
        within_s: float | None = None,
        waits: bool = True,
        lease_id: str = "",
        retry: bool = False,
    ) -> CheckResult:
        """The best servable entry of the query's scope with similarity >= the threshold.

        With leases, a miss takes the lease of its (tenant, scope, query) when none is held
        (``CheckResult.leader``: the caller makes the model call and stores the answer); when
        one is held, the check waits up to ``wait_s`` seconds for it to end, then looks again.
        No lease is taken or waited for when ``lead`` is false (a draining cache) or when the
        query's answer could never be stored (its temperature is above the cacheable limit):
        nobody would be served by waiting.

        ``within_s`` (None: no limit): the caller's time from now (its deadline less a margin);
        it bounds the wait for the scope's Stores in flight and the lease wait, so a check
        that spent time before its lease wait waits that much less, and the question's
        embedding (a late one is a miss). ``waits=False`` (the offline replay, which waits on
        its virtual clock): no wait at all, neither for Stores nor a lease, and no bound on the
        embedding (``within_s`` and ``wait_s`` are not read). ``lease_id``: the id the caller
        chose for a lease this check takes (``Leases.take``; "" = ours). ``retry``: the
        Lookup may be a retry of its request (the router's call was marked as one): only then
        does it take over the live lease its request_id took and lead at once; another check
        with that request_id (a duplicate sent at the same time, maybe through another router)
        waits on the lease like any identical request.
        """
        if not waits:
            wait_s, within_s = 0.0, None
        deadline = self.deadline_in(within_s)
        result = await self._checked(query, deadline, settle=waits, drops=lead)
        if not result.hit and query.request_id:
            self._note_miss(query)
        if result.hit or result.skip_reason or self._leases is None:
            return result
        if not lead or not self._may_be_stored(query):  # never stored: nobody to wait
            return result
        key = (query.tenant, query.scope, query.normalised)  # _check has required the text
        retried = (
            retry
            and query.mode == "use"
            and self._leases.take_over(key, query.request_id, lease_id)
        )
        if retried:
            return dataclasses.replace(result, leader=True, lease_id=retried)  # a retry of its own
        if self._leases.uncacheable(key, query.max_tokens):
            return result  # its answer would not be stored either: it calls the model at once
        event = self._leases.held(key)
        budget_s = min(wait_s, self._left_s(deadline))
        if event is not None and budget_s > 0:
            began = self._deadline_clock()  # monotonic: a wall-clock step moves no wait
            # A lease that ends without the answer (its call failed: released) wakes every
            # waiter; the first to look again takes the next lease and leads, and the others
            # wait on that one in turn, within their budget (not each a model call of its own).
            # One whose Store refused the answer for what it is marked the key first: then
            # every waiter goes on to the model at once (below), none leads.
            while await _wait_lease(self._leases, key, event, budget_s):
                result = await self._checked(query, deadline, drops=lead)
                next_event = self._leases.held(key)
                budget_s = self._wait_left_s(wait_s, began, deadline)
                if result.hit or next_event is None or budget_s <= 0:
                    break
                if self._leases.uncacheable(key, query.max_tokens):
                    break
                event = next_event
            if self._on_lease_wait is not None:
                self._on_lease_wait(self._deadline_clock() - began, result.hit)
            if result.hit:
                return dataclasses.replace(result, waited=True)
            if self._leases.uncacheable(key, query.max_tokens):
                return result
            event = self._leases.held(key)  # one past its age limit ends here: this one leads
        if event is None and query.mode == "use":
            taken = self._leases.take(key, query.request_id, lease_id)
            return dataclasses.replace(result, leader=True, lease_id=taken)
        return dataclasses.replace(result, pending=event is not None)

    def _note_miss(self, query: Query) -> None:
        """Notes the tenant's purge count at the miss of the query's request, for its Store
        (``_store``). A request_id already noted keeps its first count: a second Lookup with
        that id (a duplicate sent to another router, a retry not marked as one) after a purge
        must not clear the Store of the first one's model call, whose answer predates the
        purge; the later call's answer is then not stored either, which only costs a hit."""
        if self._missed_at.get(query.tenant, query.request_id) is None:
            self._missed_at.put(query.tenant, query.request_id, self.purges(query.tenant))

    def release(self, query: Query, lease_id: str | None = None) -> bool:
        """Ends the query's lease (its leader's model call ended without a Store), only the
        one named by ``lease_id`` when given; None (the caller named none): only if the
        query's request took it, or a request without a ``request_id`` did (``end_owned``).
        True when it was held. Its waiters wake and look again; one of them leads the next
        call."""
        key = self._lease_key(query)
        if key is None or self._leases is None:
            return False
        if lease_id is None:
            return self._leases.end_owned(key, query.request_id)
        # and only if this request took it: not a lease another request took under the same
        # id after this one's ended (a late Release or Store)
        return self._leases.end(key, lease_id, query.request_id)

    def end_lease(self, tenant: str, lease_id: str, *, owner: str | None = None) -> bool:
        """Ends ``tenant``'s lease named ``lease_id`` (a leading Lookup whose reply never
        reached its caller): True when it was held. Its waiters wake; one leads. ``owner``:
        the request_id of the request whose lease it is; then only a lease that request took
        ends. None (a Release naming no request_id: an older router): by the id alone, and not
        a lease whose id another request proposed too (``Leases.end_id``)."""
        return (
            self._leases is not None
            and bool(lease_id)
            and self._leases.end_id(tenant, lease_id, owner=owner)
        )

    @contextlib.contextmanager
    def lease_id_proposed(self, tenant: str, lease_id: str, request_id: str) -> Iterator[None]:
        """While a Lookup of the tenant's request ``request_id`` proposing ``lease_id`` runs:
        a live lease with that id, or one taken under it by another request meanwhile, is no
        more to end by its id alone (``Leases.proposing``, until ``proposal_ended``). Nothing
        without leases or an id."""
        if self._leases is None or not lease_id:
            yield
            return
        leases = self._leases
        leases.proposing(tenant, lease_id, request_id)
        try:
            yield
        finally:
            leases.proposal_ended(tenant, lease_id, request_id)

    def renew(self, tenant: str, lease_id: str, owner: str | None = None) -> bool:
        """Restarts the age limit of ``tenant``'s lease named ``lease_id`` (its leader's model
        call is still on): True when it was that live lease, and ``owner``'s (the renewing
        request's request_id; None: any request's, an older router). Its waiters keep waiting.
        By its id: no query to derive from the request again at each renewal."""
        return (
            self._leases is not None
            and bool(tenant)
            and bool(lease_id)
            and self._leases.renew(tenant, lease_id, owner)
        )

    @property
    def lease_s(self) -> float:
        """A lease's age limit from its take or renewal (0: no leases)."""
        return self._leases.hold_s if self._leases is not None else 0.0

    def lease_pending(self, query: Query) -> bool:
        """An identical request of the query's scope holds the lease (its model call is on)."""
        key = self._lease_key(query)
        return key is not None and self._leases is not None and self._leases.held(key) is not None

    def _lease_key(self, query: Query) -> LeaseKey | None:
        if self._leases is None or not query.tenant or query.text is None:
            return None
        return (query.tenant, query.scope, query.normalised)

    def _may_be_stored(self, query: Query) -> bool:
        """Whether the query's answer may be stored, as far as the query itself tells: not
        sampled above the cacheable temperature, nor a question too long to keep."""
        return (
            query.temperature <= self._policy.max_temperature
            and len(query.normalised) <= MAX_STORED_QUESTION_CHARS
        )

    def _marked(self, query: Query, answer: Answer, result: StoreResult) -> bool:
        """Marks the query's key uncacheable when its Store was refused for what the answer
        is (``StoreResult.uncacheable``), so identical requests call the model side by side
        rather than in turn (``Leases.mark_uncacheable``); ends the mark when an answer was
        stored. True when marked. An answer cut at ``max_tokens`` short of the request's own
        limit (an aborted call, a finish reason the provider did not say) marks nothing: the
        next may end whole; nor does a tool call whose arguments are not JSON."""
        key = self._lease_key(query)
        if key is None or self._leases is None or not self._may_be_stored(query):
            return False
        if result.stored:
            self._leases.clear_uncacheable(key)
            return False
        if not result.uncacheable:
            return False
        if result.skip_reason == _UNPARSED_TOOL_CALL:
            return False  # a sample gone wrong: the next may be whole
        if answer.stop_reason == MAX_TOKENS:
            if answer.output_tokens < query.max_tokens:
                return False
            self._leases.mark_uncacheable(key, query.max_tokens)
        else:
            self._leases.mark_uncacheable(key)
        return True

    def _wait_left_s(self, wait_s: float, began: float, deadline: float | None) -> float:
        """What is left of a lookup's lease wait that began at ``began`` (on the deadlines'
        clock; 0: nothing)."""
        spent_s = self._deadline_clock() - began
        return max(0.0, min(wait_s - spent_s, self._left_s(deadline)))

    def _left_s(self, deadline: float | None) -> float:
        """Seconds to ``deadline`` (on ``deadline_clock``; None: no deadline, no limit)."""
        if deadline is None:
            return math.inf
        return max(0.0, deadline - self._deadline_clock())

    async def _checked(
        self, query: Query, deadline: float | None, *, settle: bool = True, drops: bool
    ) -> CheckResult:
        """``_check``, then (``drops``: not a draining cache, which writes nothing) the drop
        of each answer met that is refused for its row (README, "Refused for its row"). The
        drops run on their own (``drops_done``): this Lookup's result is decided, so it never
        waits for their log sync."""
        refused: list[Entry] = []
        result = await self._check(query, deadline, settle=settle, refused=refused)
        if drops:
            for entry in refused:
                self._drop_refused(entry)
        return result

    def _drop_refused(self, entry: Entry) -> None:
        """Starts the drop of ``entry`` (``drop_refused``), held in ``_dropping`` until it
        ends; none when another Lookup's drop of it is on already."""
        if entry.entry_id in self._dropping:
            return

        async def drop() -> None:
            try:
                await self.drop_refused(entry.tenant, entry.entry_id)
            except WalError:  # not durable (a failed disk, which the log reports): not removed
                pass
            except Exception:  # a fault of ours: said, the answer stays refused (not served)
                log.exception(
                    "the drop of an answer refused for its row failed (tenant %r, entry %s); "
                    "it stays cached, refused, and the next Lookup meeting it tries again",
                    entry.tenant,
                    entry.entry_id,
                )
            finally:
                del self._dropping[entry.entry_id]

        self._dropping[entry.entry_id] = asyncio.ensure_future(drop())

    async def drops_done(self) -> None:
        """Waits for the drops of refused answers started so far (tests: a Lookup does not)."""
        while self._dropping:
            await asyncio.wait(set(self._dropping.values()))

    async def _check(
        self,
        query: Query,
        deadline: float | None = None,
        *,
        settle: bool = True,
        refused: list[Entry] | None = None,
    ) -> CheckResult:
        """``settle``: wait (within ``deadline``) for the scope's Stores in flight first.
        ``refused``: gets the answers met that are refused for their row (``_checked``)."""
        _require_tenant(query)
        threshold = self._threshold_for(query)
        if query.mode in ("bypass", "refresh"):
            return CheckResult(None, skip_reason=f"semantic mode {query.mode} skips the read")
        text = query.text
        if text is None or not query.normalised:
            return CheckResult(None, skip_reason=_NO_USER_TEXT)
        if present := self._policy.present_time_reason(query.namespace, text):
            return CheckResult(None, skip_reason=present)  # never stored: no read, no lease
        scope = (query.tenant, query.scope)
        if (
            settle
            and self._storing.busy(scope)
            and not self._storing.storing_question(scope, query.normalised)
        ):
            # The wait is for what a Store in flight may add; an exact hit needs none of it
            # (unless that very question is being stored again, in any casing or spacing:
            # the exact match falls back to the folded key): 0.7 ms, where waiting for
            # the scope's other questions' Stores made it 39-49 ms at p50 under 8 writers.
            early = self._exact_hit(query)
            if early is not None:
                return early
        settle_s = min(_STORE_WAIT_S, self._left_s(deadline)) if settle else 0.0
        await self._storing.settled(scope, settle_s)
        now = self._clock.now_ms()
        self._purge_expired(now)
        index = self._scopes.get((query.tenant, query.scope))
        if index is None:
            return CheckResult(None)
        # An exact match of a tier the Lookup does not accept is passed over, neither served
        # nor touched: the lookup goes on without it (a paraphrase of an accepted tier may be
        # served), and a miss then says why. Every other candidate keeps its place whatever its
        # tier: a nearest one of another tier is refused (a refusal never promotes a runner-up,
        # a worse match) and one within the margin still makes the lookup ambiguous. A miss
        # then gives the tier refusal first (why the exact answer was not served, and why the
        # Store replaces it; counted under ``tier``), with the paraphrase search's own refusal
        # after it; its ``best_similarity`` is the paraphrase search's best (the exact match's
        # 1.0 would say a search found what the refusal says was passed over).
        tier_refused = ""
        passed_over: int | None = None
        vid = self._exact_match(index, query.normalised)
        if vid is not None and self._servable(self._entries[vid], query, now):
            cached = query.read(self._entries[vid].answer)
            tier_refused = query.refusal(cached)
            if not tier_refused:
                return self._hit(vid, 1.0, exact=True, best=1.0)
            passed_over = vid
            if refused is not None and query.row_refusal(cached):
                refused.append(self._entries[vid])

        def miss(best: float, refusal: str = "") -> CheckResult:
            if tier_refused and refusal:
                refusal = f"{tier_refused} (the nearest paraphrase: {refusal})"
            return CheckResult(None, best_similarity=best, refusal=refusal or tier_refused)

        try:
            vector = await self._embed(query.tenant, text, deadline, lookup=True)
        except TimeoutError:  # the caller's time is up: a miss now (it may lead), not a late one
            return miss(0.0)
        except QueueFull as exc:  # L1 is busy: the request goes on to the model at once
            if tier_refused:  # it did read L1: the miss its refused match makes it
                return miss(0.0)
            return CheckResult(None, skip_reason=str(exc))
        # From here to the verification nothing awaits: the index cannot change under us.
        now = self._clock.now_ms()
        self._purge_expired(now)
        index = self._scopes.get((query.tenant, query.scope))
        if index is None:
            return miss(0.0)
        candidates = [
            (v, _clamp(s)) for v, s in index.search(vector, self._top_k) if v != passed_over
        ]
        best = max((s for _, s in candidates), default=0.0)
        short = shortlist(
            candidates,
            self._entries.__getitem__,
            lambda entry: self._servable(entry, query, now),
            threshold,
            self._margin,
        )
        readings: dict[int, sc.CachedAnswer | None] = {}  # each candidate's answer read once

        def read(vid: int) -> sc.CachedAnswer | None:
            if vid not in readings:
                readings[vid] = query.read(self._entries[vid].answer)
            return readings[vid]

        if refused is not None and query.accepted_models:
            # every candidate at the threshold, not only the shortlist: one beyond the margin
            # of the nearest would be within it once the nearest is gone (README)
            for vid, similarity in candidates:
                if similarity < threshold:
                    break
                met = self._entries[vid]
                if self._servable(met, query, now) and query.row_refusal(read(vid)):
                    refused.append(met)
        if short and (refusal := query.refusal(read(short[0].vid))):
            return miss(best, refusal)  # the nearest is another tier's: not verified at all
        if short and self._left_s(deadline) <= 0:  # nobody would wait for the verdicts
            return miss(best)
        choice = decide(short, await self._verify(short, query.normalised))
        if choice.vid is None:
            return miss(best, choice.reason)
        # The verifier may have run in a thread: serve the verified entry only if it is still
        # there, the same, and servable now.
        now = self._clock.now_ms()
        entry = self._entries.get(choice.vid)
        if entry is not short[0].entry or not self._servable(entry, query, now):
            return miss(best, "the nearest candidate changed while it was verified")
        return self._hit(choice.vid, choice.similarity, exact=False, best=best)

    def _exact_hit(self, query: Query) -> CheckResult | None:
        """The query's exact hit now, if there is one it may be served (its tier accepted);
        else None (the lookup goes on as usual)."""
        now = self._clock.now_ms()
        self._purge_expired(now)
        index = self._scopes.get((query.tenant, query.scope))
        if index is None:
            return None
        vid = self._exact_match(index, query.normalised)
        if vid is None:
            return None
        entry = self._entries[vid]
        if not self._servable(entry, query, now) or query.answer_refusal(entry.answer):
            return None
        return self._hit(vid, 1.0, exact=True, best=1.0)

    def _exact_match(self, index: ScopeIndex, text: str) -> int | None:
        """The entry stored with this text, else the last one stored with it up to letter
        case and spacing that is still held (``ScopeIndex.folded``), if nothing the models
        cannot read tells them apart (``folding.folding_refusal``: "ls -L" is not "ls -l",
        "How do I" is "how do I").
        A text longer than any stored question is not read here, not even up to spacing: it
        goes on to the embedding, where the same check holds, off the event loop."""
        if len(text) > MAX_STORED_QUESTION_CHARS:
            return None
        vid = index.exact.get(text)
        if vid is not None:
            return vid
        vid = index.folded.get(folded_key(text))
        if vid is None or folding_refusal(self._entries[vid].query, text):
            return None
        return vid

    async def _verify(self, short: list[Candidate], text: str) -> list[str]:
        """The verifier's verdicts (why each is refused, "" = accepted), off the event loop:
        it tokenises both texts and may run the cross-encoder."""
        if self._verifier is None or not short:
            return [""] * len(short)
        checks = [(c.entry.query, text, c.similarity) for c in short]
        return await asyncio.to_thread(self._verifier.verdicts, checks)

    async def store(
        self,
        query: Query,
        answer: Answer,
        default_ttl_s: float | None = None,
        lease_id: str | None = None,
    ) -> StoreResult:
        """Stores a cacheable answer, replacing the entry of the same normalised query.
        ``default_ttl_s`` (the tenant's policy) replaces ``ttl_s`` in a namespace without a
        TTL of its own.

        Stored or not, it ends the lease of the query's key (its waiters look again), only
        the one named by ``lease_id`` when given, and only if the query's request took it:
        the late Store of a call whose lease aged out, or was taken over, or one arriving
        after another request took a lease under the same id, leaves the lease another call
        holds now, and its waiters.
        None: only the query's request's own lease (``release``), never the lease of the
        request that led while this one called the model too. Stored for a key whose lease
        it leaves, it wakes that lease's waiters all the same (``Leases.wake``): they look
        again and are served it, rather than sleeping beside it to the end of their budget.

        Refused for what the answer is (cut at ``max_tokens``, a refusal, a tool call its
        namespace does not cache, too large, empty), it marks the key uncacheable before the
        lease ends (``_marked``): the waiters it wakes, and identical lookups for a while,
        neither wait nor lead but call the model at once. Such a Store wakes the waiters of a
        lease it leaves as well.
        """
        _require_tenant(query)
        marked = False
        try:
            with self._storing.storing((query.tenant, query.scope), query.normalised):
                result = await self._store(query, answer, default_ttl_s)
            marked = self._marked(query, answer, result)
        finally:
            ended = self.release(query, lease_id)
        key = self._lease_key(query)
        if (result.stored or marked) and not ended and key is not None and self._leases is not None:
            self._leases.wake(key)
        return result

    async def _store(
        self, query: Query, answer: Answer, default_ttl_s: float | None
    ) -> StoreResult:
        reason = _store_skip_reason(query, self._policy)
        if reason or query.text is None:
            return StoreResult(False, skip_reason=reason or _NO_USER_TEXT)
        reason = _answer_skip_reason(query, answer, self._policy)
        if not reason and not self.fits(answer.payload, query.normalised):
            reason = _OVER_MAX_BYTES
        if reason:  # the same request would get such an answer again
            return StoreResult(False, skip_reason=reason, uncacheable=True)
        vector = await self._embed(query.tenant, query.text)
        # From here to the sync nothing awaits: the log's order is the order of the changes.
        now = self._clock.now_ms()
        missed_at = self._missed_at.get(query.tenant, query.request_id)
        if missed_at is None:
            if self.purged_since(query.tenant, now - PURGE_GUARD_MS):
                return StoreResult(False, skip_reason=_PURGED_SINCE)
        elif missed_at != self.purges(query.tenant):
            return StoreResult(False, skip_reason=_PURGED_SINCE)
        self._purge_expired(now)
        entry = Entry(
            entry_id=uuid.uuid4().hex,
            tenant=query.tenant,
            scope=query.scope,
            namespace=query.namespace,
            query=query.normalised,
            answer=answer,
            created_at_ms=now,
            embedder_version=self._embedder.version,
            # fixed from now on
            expires_at_ms=now + self._policy.ttl_ms(query.namespace, default_ttl_s),
            scope_version=SCOPE_VERSION,
        )
        # Served once durable, and acknowledged then: a record the log loses (a full disk) is
        # never inserted, so never served, neither now nor after a restart (``NotDurable``).
        if not self.keeps(entry):
            return StoreResult(False, skip_reason=_OVER_SHARE, uncacheable=True)
        held = await self.durably(
            lambda: self._insert(entry, vector),
            lambda journal, applied: journal.log_store(entry, vector, applied),
        )
        if not held:  # evicted by its own store (the sharing's rounding to whole entries)
            return StoreResult(False, skip_reason=_OVER_SHARE, uncacheable=True)
        return StoreResult(True, entry_id=entry.entry_id)

    def deadline_in(self, within_s: float | None) -> float | None:
        """``within_s`` seconds from now, on the deadlines' clock (None: no deadline)."""
        return None if within_s is None else self._deadline_clock() + within_s

    async def embedding(
        self, tenant: str, text: str, deadline: float | None = None
    ) -> npt.NDArray[np.float32] | None:
        """The text's embedding: the one the tenant's check or Store of it just computed, else a
        new one if it comes before ``deadline`` (from ``deadline_in``; None: no limit). None
        when it would not: the caller's reply would be late (a wait on a lease may have taken
        all of its time). ``QueueFull`` when the embedding queue is full (L1 is busy)."""
        try:
            return await self._embed(tenant, text, deadline, lookup=True)
        except TimeoutError:
            return None

    def _threshold_for(self, query: Query) -> float:
        if query.threshold is None:
            return self._threshold
        if not (math.isfinite(query.threshold) and 0.0 <= query.threshold <= 1.0):
            raise InvalidQuery(
                "cache.threshold", f"must be a number within [0, 1], got {query.threshold}"
            )
        return query.threshold

    def _servable(self, entry: Entry, query: Query, now: int) -> bool:
        answer = entry.answer
        tools = self._policy.allows_tool_use(entry.namespace)
        return (
            now < self._expires_at(entry)
            and _whole(answer, tools)
            and answer.output_tokens <= query.max_tokens
            and (not answer.has_tool_use or tools)
            and not answer.unparsed_tool_call
            and entry.embedder_version == self._embedder.version
        )

    def _hit(self, vid: int, similarity: float, *, exact: bool, best: float) -> CheckResult:
        self._lru.used(self._entries[vid].tenant, vid)
        self._changes += 1
        return CheckResult(
            self._entries[vid], similarity=similarity, exact=exact, best_similarity=best
        )

    async def _embed(
        self, tenant: str, text: str, deadline: float | None = None, *, lookup: bool = False
    ) -> npt.NDArray[np.float32]:
        """The text's vector; ``TimeoutError`` if it would come after ``deadline`` (on
        ``deadline_clock``; None: no limit), ``QueueFull`` if the batcher refuses it.
        ``lookup``: a Lookup's (the batcher serves them before Stores')."""
        key = _recent_key(text)
        if (known := self._recent.get(tenant, key)) is not None:
            return known
        within_s = None if deadline is None else self._left_s(deadline)
        if self._batcher is not None:
            row = await self._batcher.embed_one(text, tenant, within_s=within_s, store=not lookup)
        else:
            embedding = asyncio.to_thread(self._embedder.embed, [text])
            row = (await asyncio.wait_for(embedding, within_s))[0]
        self._recent.put(tenant, key, row)
        return row


async def _wait_lease(leases: Leases, key: LeaseKey, event: asyncio.Event, budget_s: float) -> bool:
    """Waits up to ``budget_s`` for the lease's ``event``, never past the lease's age limit: a
    holder that died (no Store, no Release) ends nothing, so the waiter looks at its age itself
    (``held`` ends it then). A lease still held then (its request was retried and took it over)
    is waited for again within the budget. True when the lease ended (stored or released)."""
    while True:
        step_s = min(budget_s, leases.life_s(key))
        if await wait(event, step_s) or event.is_set():
            return True
        budget_s -= step_s
        if budget_s <= 0 or leases.held(key) is not event:
            return False


def _recent_key(text: str) -> str:
    """The text itself, or its sha256 when long: the memo never holds a long text."""
    if len(text) <= _RECENT_TEXT_CHARS:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_NO_USER_TEXT = "the last message is not a user turn with text (a prefill, or no text)"
_OVER_MAX_BYTES = (
    "the answer with its question is larger than all of L1 may hold (SEMANTIC_CACHE_MAX_BYTES)"
)
_OVER_SHARE = (
    "the answer is larger than this tenant's share of SEMANTIC_CACHE_MAX_BYTES while other "
    "tenants hold the rest (shared max-min fairly)"
)
# kept by the model adapter as {"_unparsed_arguments": ...}: served for the whole TTL, every
# agent asking got the same unusable call; not marked uncacheable (``_marked``)
_UNPARSED_TOOL_CALL = "the model's tool call arguments are not JSON"
_PURGED_SINCE = (
    "the tenant's entries were invalidated (or its L1 turned off) after this request's lookup"
)


def _require_tenant(query: Query) -> None:
    if not query.tenant:
        raise InvalidQuery("tenant", "is required")


def _store_skip_reason(query: Query, policy: NamespacePolicy) -> str:
    """Why no answer to ``query`` is stored, whatever it is ("" = one may be)."""
    if query.mode in ("no_store", "bypass"):
        return f"semantic mode {query.mode} never stores"
    if query.text is None or not query.normalised:
        return _NO_USER_TEXT
    if present := policy.present_time_reason(query.namespace, query.text):
        return present
    if len(query.normalised) > MAX_STORED_QUESTION_CHARS:
        return (
            f"the question is longer than {MAX_STORED_QUESTION_CHARS:,} characters: its "
            "meaning is read from its first 256 tokens only, and its entry would hold it all"
        )
    if query.temperature > policy.max_temperature:
        return (
            f"temperature {query.temperature} is above the cacheable limit {policy.max_temperature}"
        )
    return ""


def _answer_skip_reason(query: Query, answer: Answer, policy: NamespacePolicy) -> str:
    """Why this answer is not stored ("" = it is cacheable): what the answer is, which the
    same request would most likely get again."""
    if len(answer.payload) > MAX_STORED_ANSWER_BYTES:
        return (
            f"the answer is larger than {MAX_STORED_ANSWER_BYTES >> 20} MiB "
            f"({len(answer.payload):,} bytes serialized): too large to be logged and kept"
        )
    tools = policy.allows_tool_use(query.namespace)
    if answer.has_tool_use and not tools:
        return (
            f"the answer holds a tool call (namespace {shown(query.namespace)} does not allow it)"
        )
    if not _whole(answer, tools):
        return (
            f"stop_reason {answer.stop_reason or '(unset)'}: only end_turn answers are stored "
            "(and, in SEMANTIC_CACHE_TOOL_USE_NAMESPACES, tool_use ones holding a tool call)"
        )
    if not answer.has_text and not answer.has_tool_use:
        return "empty answer: no content block with text and no tool call"
    if answer.unparsed_tool_call:
        return _UNPARSED_TOOL_CALL
    return ""


def _whole(answer: Answer, tools_allowed: bool) -> bool:
    """The answer is a whole turn: it ended ``end_turn``, or (where the namespace caches tool
    calls: ``tools_allowed``) ``tool_use`` with a tool call, as every provider ends a turn
    that calls a tool. Cut (``max_tokens``) and refused (``refusal``) answers are not."""
    if answer.stop_reason == END_TURN:
        return True
    return tools_allowed and answer.stop_reason == TOOL_USE and answer.has_tool_use
