"""One request's life in the router: L1 lookup, tier, plan, model call, commits, store.

``Pipeline.run`` yields the Gateway's chunks (``start``, text ``delta``s, ``end``) so that
``Complete`` and ``StreamComplete`` share one path. A dependency that is down degrades the
request and never loses it: no semantic cache → the model answers; no prefix-cache → the
answer is served with ``cost.estimated`` and billed later (the outbox); a replica down → the
next replica (or, for ``auto``, the other tiers), also when it dies or hangs (``SilenceWatch``)
mid-answer before anything reached the caller; ``UNAVAILABLE`` only when no layer can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2
from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import Clock
from services.common.errors import Code, RequestError
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.prompt import last_user_text
from services.common.span_events import record_event
from services.common.telemetry import current_span_id, current_trace_id
from services.common.tokens import Tokenizer, Tokenizers
from services.router import spans
from services.router.billing import (
    Billing,
    Bills,
    Charge,
    LateBill,
)
from services.router.calls import Calls, PrefixWindow
from services.router.dependencies import Dependencies
from services.router.dispatch import Dispatcher
from services.router.metrics import RouterMetrics
from services.router.model_answer import (
    MAX_REPLICA_RETRIES,
    AnswerBilled,
    ModelAnswers,
    ModelRefused,
    ModelSent,
    ReplicaCut,
    accepted_tiers,
)
from services.router.model_facts import ModelScopes
from services.router.outbox import BillingOutbox
from services.router.prompt_counts import count_prompt
from services.router.read_ahead import ReadAheadBudget
from services.router.routing.model import RouterModel
from services.router.routing.router import LocalEmbedder, TierRouter
from services.router.settings import RouterSettings

log = logging.getLogger("cachemesh.router")

# The model calls end this much before the client's deadline (100 ms, or a tenth of a shorter
# deadline, but at least 50 ms), so the router can still tell the client why before the client
# gives up: with a tenth alone, a 0.2 s deadline left 20 ms, and on a loaded machine 5 of 64
# such cuts (billed) reached their callers after gRPC's own deadline, which the client then
# told as "no word from the Gateway" (30 ms at 0.3 s: 0 of 64).
_REPLY_MARGIN_S = 0.1
_REPLY_MARGIN_FRACTION = 0.1
_REPLY_MARGIN_FLOOR_S = 0.05


# awaited once L1 did not answer a request, before its first model call: an answer it returns
# (another call's, for the same request_id) is served instead of calling the model
BeforeModel = Callable[[], Awaitable[pb.CompleteResponse | None]]
_T = TypeVar("_T")


_TIER_REFUSAL = "tier:"  # L1's refusal of an auto hit of a tier the request does not accept
# ... and those of an auto hit another row made (``ModelScopes.accepted_models``)
_ANSWER_REFUSALS = (_TIER_REFUSAL, "model:")


class Pipeline:
    def __init__(
        self,
        dependencies: Dependencies,
        table: ModelTable,
        tokenizer: Tokenizers | Tokenizer,
        tracer: trace.Tracer,
        settings: RouterSettings,
        router: tuple[RouterModel, float, LocalEmbedder | None],
        outbox: BillingOutbox | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: RouterMetrics | None = None,
        hand_over_stalls: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall: Clock | None = None,
        read_ahead: bool = True,
    ) -> None:
        """``tokenizer``: each row's (one ``Tokenizer``: the only vocabulary, for tests and
        tools whose rows all use it), for the router's own counts of a row's prompt and output.
        ``router``: the learned model, its default threshold, the fallback embedder.
        ``outbox`` keeps the commits prefix-cache did not take, to bill them when it is back
        (None: such answers stay estimated and unbilled, as in the offline estimator).
        ``metrics``: the service's (None: the offline estimator, which counts nothing).
        ``hand_over_stalls``: a simulated or self-hosted replica's call with no first report
        long past its predicted prefill goes to the next replica (``Dispatcher``); its timer
        is the event loop's, so a replay on a virtual clock turns it off.
        ``sleep``: waits seconds on ``clock`` (between the renewals of a leading Lookup's
        lease); a replay's parks the task on its virtual clock.
        ``wall``: prefix-cache's clock (the time of day; a replay's virtual one), for the arrival
        a WARM without a Plan carries (None: the system's).
        ``read_ahead``: a model's stream is read in a task of its own ahead of its caller
        (``read_ahead``); False: in the request's own task as its caller asks (an offline
        replay, whose caller takes each chunk at once and whose virtual clock would count a
        request waiting on that task as running, so it never advanced)."""
        self._metrics = metrics
        counted = metrics.degraded if metrics is not None else None
        self._background: set[asyncio.Future[Any]] = set()
        # what L1's scope holds of each model string: once, as the table does not change
        self._scopes = ModelScopes(table)
        # a lost Lookup's Release runs past its request: ``drain`` awaits it too
        self._calls = Calls(
            dependencies,
            settings,
            counted,
            tracer,
            clock,
            sleep,
            background=self._in_background,
            hung=metrics.breaker_opened if metrics is not None else None,
            tenant_left_alone=metrics.l1_tenant_left_alone if metrics is not None else None,
            models=self._scopes,
        )
        self._tracer = tracer
        self._table = table
        self._tokenizers = Tokenizers.of(tokenizer)
        self._clock = clock
        self._dispatch = Dispatcher(
            self._calls,
            dependencies,
            table,
            tracer,
            settings.choice,
            self._clock,
            self._tokenizers,
            metrics.ejected if metrics is not None else None,
            hand_over_stalls,
            settings.mid_answer_stall_s,
            wall,
        )
        model, threshold, local = router
        self._router = TierRouter(
            model,
            threshold,
            table,
            self._calls,
            dependencies,
            local,
            settings.cost_aware,
            settings.tier_thresholds,
            settings.write_amortize_turns,
            self._clock,
        )
        self.loads = self._dispatch.loads
        self._stores: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()  # L1's, of those
        self._outbox = outbox
        self._billing = Billing(
            self._calls,
            outbox,
            self._tokenizers,
            tracer,
            self._clock,
            metrics,
            self._in_background,
            self._stores,
        )
        self._answers = ModelAnswers(
            self._dispatch,
            self._router,
            table,
            self._billing,
            outbox,
            self._tokenizers,
            self._clock,
            metrics,
            read_ahead,
            # the bytes of the model streams read ahead of their callers, all calls together
            ReadAheadBudget(settings.read_ahead_max_bytes),
        )

    async def run(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        *,
        streamed: bool = True,
        time_remaining_s: float | None = None,
        charge: Charge | None = None,
        bills: Bills | None = None,
        answer_billed: AnswerBilled | None = None,
        retried: bool = False,
        before_model: BeforeModel | None = None,
        model_sent: ModelSent | None = None,
        model_refused: ModelRefused | None = None,
        late_bill: LateBill | None = None,
    ) -> AsyncGenerator[pb.CompleteChunk, None]:
        """The answer's chunks. ``streamed``: each chunk reaches the caller as it is yielded
        (``StreamComplete``); else only the end does (``Complete``: a model's answer is then
        yielded whole, its start with its end, and an L1 hit its end alone), so a replica
        that dies mid-answer can hand the request to another one at any point before the end.
        ``time_remaining_s``: the client's deadline, which bounds every model call of the
        request (and so the replicas' retries); None: ``ROUTER_MODEL_TIMEOUT_S`` alone.
        ``charge``: told of each model call this request is billed for without its answer
        (cancelled or cut after the prefill), for the tenant's limits; ``bills`` gets the
        pending bill of each such call (the access log's line waits for them).
        ``answer_billed``: told the answer (its end) once its bill is made or kept, before any of
        its chunks that follow go out: a caller that leaves before it reads the end was
        answered and billed all the same (the limits count it).
        ``retried``: the call was marked as a possible retry: its L1 Lookup may take over the
        single-flight lease its request_id holds. ``before_model``: awaited once L1 did not
        answer, before the first model call (an L1 hit never awaits it), with this request's
        L1 lease (if it leads) kept meanwhile; an answer it returns is served as it is, with no
        model call and no Store (it is another call's: billed, and stored, by that call).
        ``model_sent``: told (once or more) just before a model call is sent to a replica; a
        request that ends before that (cancelled, out of time or refused during its Lookup,
        a wait on an identical request's call, its Plan, or ``before_model``) used no model
        tokens (the servicer gives its limits' reservation back whole). ``model_refused``:
        told when such a call ended with its replica's refusal before its start (nothing
        produced, nothing billed): a request whose every model call was refused so used no
        model tokens either. ``late_bill``: told the bill to come of an answer that goes out
        at the router's estimate before its FINAL answered (``Billing._bill_answer``); the answer's
        accounting (limits, cost counters, access line) waits for it."""
        deadline = None
        if time_remaining_s is not None:
            tenth = _REPLY_MARGIN_FRACTION * max(time_remaining_s, 0.0)
            margin = min(_REPLY_MARGIN_S, max(_REPLY_MARGIN_FLOOR_S, tenth))
            deadline = self._clock() + time_remaining_s - margin
        root = trace.get_current_span()  # the servicer named its tenant and request on it
        head = pb.CompleteResponse(
            request_id=request.request_id, trace_id=current_trace_id(), span_id=current_span_id()
        )
        baseline = self._table.baseline_for(request.model)

        lookup = await self._lookup(tenant, request, deadline, retried)
        if lookup is not None:
            log.debug("L1 lookup: %s", _lookup_result(lookup))
        refused = self._below_lowest_tier(request, lookup) or self._other_row(request, lookup)
        if refused:  # an L1 that did not read accepted_tiers / accepted_models: refused here
            assert lookup is not None
            lookup = semantic_cache_pb2.LookupResponse(
                best_similarity=lookup.best_similarity, refusal=refused
            )
        elif lookup is not None and lookup.refusal.startswith(_ANSWER_REFUSALS):
            refused = lookup.refusal  # L1 refused it, and counted it as a miss
        if refused:
            # the model answers, and its Store replaces an exact match's weaker answer
            record_event(self._tracer, "cachemesh.semantic.hit_refused", {"reason": refused})
        if lookup is not None and lookup.hit:
            end = await self._serve_hit(tenant, request, lookup, baseline, head)
            spans.outcome_attributes(root, end)
            if answer_billed is not None:
                answer_billed(end)
            # ``Complete`` reads only the end: its start and deltas are made for a stream alone
            for served in chunks_of(end) if streamed else (pb.CompleteChunk(end=end),):
                yield served
            return

        answered = False
        cut: set[str] = set()  # replicas cut mid-answer on this request
        # the request's prefix-cache calls: each within half of what its deadline leaves, and
        # none after one timed out or was skipped (across retries on other replicas too)
        window = PrefixWindow(deadline)
        unanswered = spans.UnansweredBills(root)
        last_cut: ReplicaCut | None = None
        # a leader holds its lease for as long as its model call runs (and a retry on another
        # replica), not just its age limit: identical requests keep waiting for this call
        keeper: asyncio.Future[None] | None = None
        if lookup is not None and lookup.leader:
            keeper = asyncio.ensure_future(self._calls.keep_lease(tenant, request, lookup))
        try:
            if before_model is not None and (replayed := await before_model()) is not None:
                for served in chunks_of(replayed):
                    yield served
                return
            self._refuse_if_outbox_full()
            while True:
                emitted = False
                try:
                    async with contextlib.aclosing(
                        self._answers.answer(
                            tenant,
                            request,
                            baseline,
                            head,
                            lookup,
                            frozenset(cut),
                            window,
                            streamed,
                            charge,
                            bills,
                            unanswered,
                            answer_billed,
                            model_sent=model_sent,
                            model_refused=model_refused,
                            late_bill=late_bill,
                        )
                    ) as it:
                        async for chunk in it:
                            answered = chunk.WhichOneof("part") == "end"  # its Store is on
                            if answered and keeper is not None:
                                keeper.cancel()  # the Store, sent, ends the lease
                            emitted = streamed
                            yield chunk
                    break
                except ReplicaCut as exc:
                    # nothing of this answer reached the caller: another replica answers it
                    if emitted or len(cut) >= MAX_REPLICA_RETRIES:
                        if exc.unretried is not None:
                            raise exc.unretried from exc
                        raise
                    cut.add(exc.replica)
                    last_cut = exc
                    log.warning(
                        "retrying on another replica: %s cut before its answer reached the caller",
                        exc.replica,
                    )
                    root.add_event("cachemesh.replica_retry", {"replica": exc.replica})
                except RequestError as exc:
                    if last_cut is not None and exc.code == Code.UNAVAILABLE and not emitted:
                        # no other replica: the cut is what happened
                        raise (last_cut.unretried or last_cut) from exc
                    raise
        finally:
            if keeper is not None:  # failed or cancelled: the Release ends the lease now
                keeper.cancel()
            if lookup is not None and lookup.leader and not answered:
                # Cancelled or failed before its Store: free the identical requests waiting
                # on this one's lease now, not at the lease's age limit.
                self._in_background(self._calls.release(tenant, request, lookup.lease_id))

    def _refuse_if_outbox_full(self) -> None:
        """No model call while the billing outbox in memory is over its bound: its answer
        could not be kept for billing without growing the router past it; nor while the
        outbox's journal cannot write (a full disk) and prefix-cache takes no bill: its bill
        could be neither sent nor kept durably, and its answer would be refused after the
        provider is paid (before: one model call a client's retry, none billed). Refused
        before the provider is paid, so nothing is served unbilled and nothing kept is
        dropped."""
        if self._outbox is None:
            return
        if self._outbox.full:
            message = (
                "prefix-cache has not taken the bills of this router's earlier answers and its "
                "billing outbox in memory is full (ROUTER_OUTBOX_MAX_BYTES): no model call can "
                "be billed now; retry later (an operator can set ROUTER_DATA_DIR to keep the "
                "outbox on disk)"
            )
        elif self._outbox.cannot_keep:
            message = (
                "prefix-cache is not taking bills and this router's billing journal cannot "
                "write (its ROUTER_DATA_DIR volume is full or failing): no model call can be "
                "billed now; retry later (an operator must free space on ROUTER_DATA_DIR or "
                "bring prefix-cache back)"
            )
        else:
            return
        if self._metrics is not None:
            self._metrics.outbox_refused()
        raise RequestError(Code.UNAVAILABLE, message)

    async def _lookup(
        self, tenant: str, request: pb.CompleteRequest, deadline: float | None, retried: bool
    ) -> semantic_cache_pb2.LookupResponse | None:
        """L1's answer; for ``auto`` also the question's embedding (the tier router's input),
        which the semantic cache returns without a lookup when the request bypasses L1.
        ``deadline`` (the model calls') bounds a wait on an identical request's model call.
        A REFRESH is looked up too: L1 reads nothing for it (no embedding, no wait) but notes
        its miss, which its Store needs to replace the entry after a purge of the tenant."""
        if last_user_text(request) is None:
            return None
        auto = request.model == AUTO
        if request.cache.semantic == pb.SEMANTIC_MODE_BYPASS and not auto:
            return None
        return await self._calls.lookup(
            tenant,
            request,
            want_embedding=auto,
            deadline=deadline,
            accepted_tiers=accepted_tiers(self._table, self._router, request),
            retry=retried,
        )

    def _below_lowest_tier(
        self, request: pb.CompleteRequest, lookup: semantic_cache_pb2.LookupResponse | None
    ) -> str:
        """Why L1's hit for an ``auto`` request is not served ("" = it is, or no hit): its
        answer's tier is not one the request accepts (``model_answer.accepted_tiers``), which
        L1 did not refuse itself (one older than ``accepted_tiers``)."""
        if lookup is None or not lookup.hit:
            return ""
        accepted = accepted_tiers(self._table, self._router, request)
        tier = lookup.answer.tier
        if not accepted or tier in accepted:
            return ""
        return f"{_TIER_REFUSAL} the cached answer is the {tier} tier's; the request accepts " + (
            ", ".join(accepted)
        )

    def _other_row(
        self, request: pb.CompleteRequest, lookup: semantic_cache_pb2.LookupResponse | None
    ) -> str:
        """Why L1's hit for an ``auto`` request is not served ("" = it is, or no hit): another
        row made it than its tiers resolve to now (``ModelScopes.accepted_models``), which L1
        did not refuse itself (one older than ``accepted_models``, or rolled back to one)."""
        if lookup is None or not lookup.hit:
            return ""
        rows = self._scopes.accepted_models(request.model)
        if not rows or lookup.answer.model in rows:
            return ""
        return (
            f"model: the cached answer is {lookup.answer.model}'s; the request's model "
            f"resolves to {', '.join(rows)} now"
        )

    async def _serve_hit(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        lookup: semantic_cache_pb2.LookupResponse,
        baseline: ModelSpec,
        head: pb.CompleteResponse,
    ) -> pb.CompleteResponse:
        answer = lookup.answer
        # counted here, or the token rate's count reused (a hit makes no Plan call); by the
        # baseline row's tokenizer (the requested model's, the large tier's for auto)
        prompt = count_prompt(request, self._tokenizers.for_spec(baseline))
        baseline_nanos = baseline.baseline_nanos(prompt, answer.output_tokens)
        end = pb.CompleteResponse()
        end.CopyFrom(head)
        end.content.extend(answer.content)
        end.served_by = pb.LAYER_SEMANTIC_CACHE
        end.model = answer.model
        end.tier = answer.tier
        end.stop_reason = answer.stop_reason
        end.usage.CopyFrom(pb.Usage(input_tokens=prompt, output_tokens=answer.output_tokens))
        end.cost.CopyFrom(
            pb.Cost(cost_nanos=0, baseline_nanos=baseline_nanos, saved_nanos=baseline_nanos)
        )
        end.semantic.CopyFrom(lookup.match)
        return end

    def _in_background(self, call: Awaitable[_T]) -> asyncio.Future[_T]:
        """Runs ``call`` past the request's end (``drain`` awaits it at shutdown)."""
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Awaits every background task (the bills of calls that ended early, their commits
        and outbox writes, the L1 Stores), those started while it waits too: a handler
        cancelled at shutdown schedules its call's bill as it unwinds. A task that failed is
        logged, never lost."""
        await self._drain(stores=True)

    async def drain_bills(self) -> None:
        """``drain`` but for the L1 Stores (each up to its own 10 s deadline): at shutdown the
        bills go first, within the stack's time before its SIGKILL (``end_stores`` after)."""
        await self._drain(stores=False)

    async def end_stores(self, within_s: float) -> None:
        """Gives the L1 Stores still running ``within_s``, then cancels the rest (a lost
        Store costs only a future hit), logging how many."""
        pending = [task for task in self._stores if not task.done()]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=within_s)
        # their cancel waited for at most TASKS_END_S: a Store that took it and went on held
        # the stop forever (abandoned, named in an ERROR line)
        await cancel_within(list(late), TASKS_END_S, "router stop: semantic Stores")
        if late:
            log.warning(
                "router stop: %d semantic Store(s) still running after %.1f s cancelled; "
                "their answers are not cached in L1 (a later identical request calls the model)",
                len(late),
                within_s,
            )

    async def _drain(self, *, stores: bool) -> None:
        def waited(task: asyncio.Future[Any]) -> bool:
            return not task.done() and (stores or task not in self._stores)

        while pending := [task for task in self._background if waited(task)]:
            ended = await asyncio.gather(*pending, return_exceptions=True)
            for failed in ended:
                if isinstance(failed, Exception):
                    log.error("a billing task failed at shutdown: %s", failed, exc_info=failed)


def _lookup_result(lookup: semantic_cache_pb2.LookupResponse) -> str:
    if lookup.hit:
        return f"hit ({'exact' if lookup.match.exact else 'paraphrase'})"
    if lookup.skip_reason:
        return "skipped"
    return "pending" if lookup.pending else f"miss (best similarity {lookup.best_similarity:.3f})"


def chunks_of(end: pb.CompleteResponse) -> list[pb.CompleteChunk]:
    """A finished answer (an L1 hit, a ledger's replay) as the Gateway streams it: start, one
    delta a block, end. The start tells the prompt's usage, as a model answer's does
    (``model_answer._headed``): a client reads the input tokens at the start (Anthropic's
    message_start)."""
    start = pb.CompleteResponse(
        served_by=end.served_by,
        model=end.model,
        tier=end.tier,
        trace_id=end.trace_id,
        span_id=end.span_id,
        request_id=end.request_id,
        replayed=end.replayed,
        usage=pb.Usage(
            input_tokens=end.usage.input_tokens,
            cache_creation_input_tokens=end.usage.cache_creation_input_tokens,
            cache_read_input_tokens=end.usage.cache_read_input_tokens,
        ),
    )
    if end.usage.HasField("cache_creation"):
        start.usage.cache_creation.CopyFrom(end.usage.cache_creation)
    if end.HasField("semantic"):
        start.semantic.CopyFrom(end.semantic)
    return [
        pb.CompleteChunk(start=start),
        *(pb.CompleteChunk(delta=block) for block in end.content),
        pb.CompleteChunk(end=end),
    ]
