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
import sys
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, semantic_cache_pb2
from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import Clock
from services.common.deadlines import END_MARGIN_S
from services.common.errors import Code, RequestError
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.prompt import last_user_text
from services.common.span_events import record_event
from services.common.telemetry import current_span_id, current_trace_id
from services.common.tokens import Tokenizer, Tokenizers
from services.router import spans
from services.router.answer import Answer
from services.router.billing import (
    Billing,
    Bills,
    Charge,
    CommitReply,
    LateBill,
    served_by,
)
from services.router.calls import Calls, PrefixWindow, warm_commit
from services.router.dependencies import CallFailed, Dependencies
from services.router.dispatch import Attempt, Dispatcher, Silent
from services.router.metrics import RouterMetrics, decision_reason
from services.router.open_calls import OpenCall
from services.router.outbox import BillingOutbox
from services.router.prompt_counts import count_prompt
from services.router.read_ahead import ReadAhead, ReadAheadBudget, ReadInTurn
from services.router.routing.model import RouterModel
from services.router.routing.router import LocalEmbedder, Routed, TierRouter
from services.router.settings import RouterSettings

log = logging.getLogger("cachemesh.router")

# How many replicas that died mid-answer one request may be handed on from.
_MAX_REPLICA_RETRIES = 2
# The model calls end this much before the client's deadline (100 ms, or a tenth of a shorter
# deadline), so the router can still tell the client why before the client gives up.
_REPLY_MARGIN_S = 0.1
_REPLY_MARGIN_FRACTION = 0.1


# An answer that broke off this close to its call's deadline was cut by the deadline (the
# replica's provider adapter ends it at most this long before it), not by the replica.
_DEADLINE_SLACK_S = END_MARGIN_S


def _answer_outlasted(
    attempt: Attempt, output_tokens: int | None, reported: bool = False
) -> DeadlineCut:
    """A model call still answering at its deadline: another replica would take as long, so
    it is not retried (it is billed for what it produced, never stored). ``reported``: its
    provider reported its usage so far (Anthropic's prompt, from message_start)."""
    produced = f" after {output_tokens} tokens" if output_tokens is not None else ""
    billed = "what was produced"
    if output_tokens == 0:  # its prompt was prefilled (a start came), no token yet
        produced = " before its first token"
        billed = "its prompt" + (", as the provider reported it" if reported else "")
    if attempt.routers_deadline:
        whose = "the router's ROUTER_MODEL_TIMEOUT_S"
        allow = "A retry would be cut the same way; ask for a smaller max_tokens"
        if output_tokens == 0:  # no token at all: its provider stalled, max_tokens is not why
            allow = "Its provider gave no token in that time; retry later"
    else:
        whose = "the request's deadline"
        allow = "Allow a longer deadline or a smaller max_tokens"
    return DeadlineCut(
        attempt.routers_deadline,
        f"the {attempt.model.id} answer was still running at its deadline, {whose} "
        f"({attempt.timeout_s:.1f} s), and was cut{produced}; billed for {billed}, not "
        f"cached. {allow}",
    )


class DeadlineCut(RequestError):
    """A model call cut while still answering at its deadline (DEADLINE_EXCEEDED, never
    retried: a retry is a second bill, cut again). ``routers``: the deadline was the router's
    ROUTER_MODEL_TIMEOUT_S, sooner than the caller's own (or the caller set none): the server's
    fault, counted as ``cachemesh_router_errors_total{deadline="router"}`` and alerted on."""

    def __init__(self, routers: bool, message: str) -> None:
        super().__init__(Code.DEADLINE_EXCEEDED, message)
        self.routers = routers


class ReplicaCut(RequestError):
    """The replica serving the request died, or its provider's stream broke off, mid-answer,
    or its provider gave no token by ``ROUTER_MODEL_TIMEOUT_S`` after reporting the prompt
    (UNAVAILABLE). The cut call is billed for what it produced and never stored.
    ``unretried``: what the caller is told when no other replica takes the request over
    (None: this cut)."""

    def __init__(self, replica: str, message: str, unretried: RequestError | None = None) -> None:
        super().__init__(Code.UNAVAILABLE, message)
        self.replica = replica
        self.unretried = unretried


def _another_has_time(attempt: Attempt, deadline: float | None) -> bool:
    """Whether the request's ``deadline`` (None: the client gave none) leaves another replica
    time once ``attempt``'s call reached its own deadline: more than ``_DEADLINE_SLACK_S``
    past it. The call's deadline was the request's when the client's was the sooner
    (``Calls.model_timeout_s``): none past it, a cut that another replica would only repeat."""
    if deadline is None:
        return True
    return deadline - (attempt.opened_at + attempt.timeout_s) > _DEADLINE_SLACK_S


def _cut_unstarted(attempt: Attempt, outlasted: DeadlineCut) -> ReplicaCut:
    """A call cut at ``ROUTER_MODEL_TIMEOUT_S`` before its first token, after its provider
    reported the prompt (``Attempt.cut_before_first_token``), with time left for another
    replica: nothing of it reached the caller, so the request goes there, as it would for a
    call with no start by its deadline. With none to take it the caller gets ``outlasted``
    (DEADLINE_EXCEEDED, the router's: an UNAVAILABLE would have the client retry into a
    second bill, cut the same way)."""
    return ReplicaCut(
        attempt.replica,
        f"the {attempt.model.id} provider reported the prompt but gave no token within "
        f"ROUTER_MODEL_TIMEOUT_S ({attempt.timeout_s:.1f} s)",
        outlasted,
    )


# told a request's answer as soon as its bill is made or kept, before its chunks go out
AnswerBilled = Callable[[pb.CompleteResponse], None]
# awaited once L1 did not answer a request, before its first model call: an answer it returns
# (another call's, for the same request_id) is served instead of calling the model
BeforeModel = Callable[[], Awaitable[pb.CompleteResponse | None]]
# told as a model call of the request is about to be sent to a replica (its Generate): until
# the first time, the request used no model tokens, whatever ended it
ModelSent = Callable[[], None]
# told as a model call told ``ModelSent`` ended with its replica's refusal before its start (a
# status of the replica's own, not a deadline): it produced nothing and is billed nothing, so a
# request whose every model call was refused used no model tokens either
ModelRefused = Callable[[], None]
_T = TypeVar("_T")


_TIER_REFUSAL = "tier:"  # L1's refusal of an auto hit of a tier the request does not accept


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
        )
        self._tracer = tracer
        self._table = table
        # the bytes of the model streams read ahead of their callers, all calls together
        self._ahead_budget = ReadAheadBudget(settings.read_ahead_max_bytes)
        self._tokenizers = Tokenizers.of(tokenizer)
        self._clock = clock
        self._read_ahead = read_ahead
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
        yielded whole, its start with its end), so a replica that dies mid-answer can hand
        the request to another one at any point before the end.
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
            margin = min(_REPLY_MARGIN_S, _REPLY_MARGIN_FRACTION * max(time_remaining_s, 0.0))
            deadline = self._clock() + time_remaining_s - margin
        root = trace.get_current_span()  # the servicer named its tenant and request on it
        head = pb.CompleteResponse(
            request_id=request.request_id, trace_id=current_trace_id(), span_id=current_span_id()
        )
        baseline = self._table.baseline_for(request.model)

        lookup = await self._lookup(tenant, request, deadline, retried)
        if lookup is not None:
            log.debug("L1 lookup: %s", _lookup_result(lookup))
        refused = self._below_lowest_tier(request, lookup)
        if refused:  # an L1 that did not read the request's accepted_tiers: refused here
            assert lookup is not None
            lookup = semantic_cache_pb2.LookupResponse(
                best_similarity=lookup.best_similarity, refusal=refused
            )
        elif lookup is not None and lookup.refusal.startswith(_TIER_REFUSAL):
            refused = lookup.refusal  # L1 refused it, and counted it as a miss
        if refused:
            # the model answers, and its Store replaces an exact match's weaker answer
            record_event(self._tracer, "cachemesh.semantic.hit_refused", {"reason": refused})
        if lookup is not None and lookup.hit:
            end = await self._serve_hit(tenant, request, lookup, baseline, head)
            spans.outcome_attributes(root, end)
            if answer_billed is not None:
                answer_billed(end)
            for served in chunks_of(end):
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
                        self._from_model(
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
                    if emitted or len(cut) >= _MAX_REPLICA_RETRIES:
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

    async def _from_model(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        baseline: ModelSpec,
        head: pb.CompleteResponse,
        lookup: semantic_cache_pb2.LookupResponse | None,
        exclude: frozenset[str],
        window: PrefixWindow,
        streamed: bool = True,
        charge: Charge | None = None,
        bills: Bills | None = None,
        unanswered: spans.UnansweredBills | None = None,
        answer_billed: AnswerBilled | None = None,
        retried: bool = False,
        before_model: BeforeModel | None = None,
        model_sent: ModelSent | None = None,
        model_refused: ModelRefused | None = None,
        late_bill: LateBill | None = None,
    ) -> AsyncGenerator[pb.CompleteChunk, None]:
        """The model's answer as chunks; not ``streamed`` (``Complete``): only the start and
        the end, once the answer is whole. A call that ends without its answer is billed in
        the background (``Billing.bill_partial``), its bill added to ``unanswered``. ``window``: the
        request's deadline and its prefix-cache calls. ``model_sent``, ``model_refused``,
        ``late_bill``: as ``run``'s."""
        root = trace.get_current_span()
        began = self._clock()
        routed: Routed | None = None
        if request.model == AUTO:
            routed = await self._router.route(tenant, request, lookup, window)
            head.routing.CopyFrom(spans.routing(root, routed.decision))
        attempt = await self._dispatch.open(
            tenant,
            request,
            routed,
            exclude,
            window.deadline,
            window,
            accepted=self._accepted_tiers(request),
            sent=model_sent,
            declined=model_refused,
        )
        if routed is not None and attempt.tier_reason.startswith("fallback"):
            # the routed tier could not answer: the reason says why another tier did
            head.routing.reason = f"{routed.decision.reason}; {attempt.tier_reason}"
            root.set_attribute("cachemesh.routing.reason", head.routing.reason)
        spans.route_attributes(root, attempt.replica, attempt.route, attempt.start)
        root.set_attribute("cachemesh.tier_reason", attempt.tier_reason)
        if self._metrics is not None:
            reason = decision_reason(
                attempt.tier_reason, routed.decision if routed is not None else None
            )
            self._metrics.decided(attempt.model.tier, reason)
        log.debug(
            "model call: %s on %s (%s tier: %s), %d prompt tokens, %d from its KV cache",
            attempt.model.id,
            attempt.replica,
            attempt.model.tier,
            "requested" if routed is None else "routed",
            attempt.start.prompt_tokens,
            attempt.start.kv_cached_tokens,
        )
        # The WARM commit runs beside the answer: a streamed answer waits for it at its first
        # token (the start's served_by), Complete only before the FINAL, so the model's first
        # token (for Complete, its whole decode) hides it. Shielded: once the replica
        # prefilled, the prompt is billed even if the caller leaves meanwhile (its FINAL
        # follows the WARM). Before it is sent the call is journalled as open, so that a
        # router killed before its FINAL has it billed at its next start.
        tokenizer = self._tokenizers.for_spec(attempt.model)
        open_call = OpenCall(self._outbox, tokenizer.count, self._clock)
        first_warm = warm_commit(
            tenant,
            attempt.commit_key(request.request_id),
            attempt.model.id,
            attempt.replica,
            attempt.start.kv_cached_tokens,
            attempt.planned_read,
            attempt.plan_id,
            attempt.start.kv_cached_unreported,
            attempt.planned_at_ms,
        )
        written = self._billing.journal_open(
            tenant, request, attempt, baseline, first_warm, open_call
        )
        warm_call: asyncio.Future[CommitReply] = asyncio.ensure_future(
            self._billing.warm_once_written(
                tenant, request, attempt, first_warm, open_call, written, window
            )
        )
        answer = Answer()
        finished = False
        ended: pb.CompleteResponse | None = None
        # a call silent mid-answer is cut (as one whose replica died) while another replica
        # could take the request over: this request may be handed on once more
        retry = len(exclude) < _MAX_REPLICA_RETRIES
        watch = self._dispatch.watch(attempt, exclude) if retry else None
        read = attempt.stream.read if watch is None else partial(watch.read, attempt.stream)
        # read on the model's time, whatever the caller's pace (``read_ahead``)
        arrived = partial(self._arrived, attempt, open_call)
        ahead: ReadAhead | ReadInTurn = (
            ReadAhead(read, request.max_tokens, self._clock, arrived, self._ahead_budget)
            if self._read_ahead
            else ReadInTurn(read, self._clock, arrived)
        )
        end_chunk: model_pb2.GenerateEnd | None = None
        try:
            # the start goes out with the first token: until then a replica that dies leaves
            # nothing sent, and the request can go to another replica
            end_at = 0.0  # when the end came
            while True:
                chunk, at = await ahead.read()
                if chunk is None:
                    break
                part = chunk.WhichOneof("part")
                if part == "text" or part == "block":
                    delta = answer.add(chunk)
                    if answer.first:
                        ttft = self._clock() - began
                        spans.first_token(root, attempt.chat_span, ttft)
                        if self._metrics is not None:
                            self._metrics.first_token(attempt.model.tier, ttft)
                        if streamed:
                            _headed(head, attempt.model, await asyncio.shield(warm_call))
                            yield pb.CompleteChunk(start=head)
                    if streamed:
                        yield pb.CompleteChunk(delta=delta)
                elif part == "progress":
                    answer.progressed(chunk.progress)
                elif part == "end":
                    end_chunk, end_at = chunk.end, at
            if end_chunk is None:
                raise RequestError(Code.UNAVAILABLE, "the model ended without an answer")
            if end_chunk.interrupted:
                _ended(answer, end_chunk)
                reported = end_chunk.HasField("provider_usage")
                if attempt.cut_before_first_token and _another_has_time(attempt, window.deadline):
                    outlasted = _answer_outlasted(attempt, end_chunk.output_tokens, reported)
                    raise _cut_unstarted(attempt, outlasted)
                if end_at >= attempt.opened_at + attempt.timeout_s - _DEADLINE_SLACK_S:
                    raise _answer_outlasted(attempt, end_chunk.output_tokens, reported)
                raise ReplicaCut(
                    attempt.replica,
                    f"the {attempt.model.id} provider's answer broke off after "
                    f"{end_chunk.output_tokens} tokens ({end_chunk.error}); billed for what "
                    "was produced, not cached; retry",
                )
            warm = await asyncio.shield(warm_call)
            _headed(head, attempt.model, warm)
            end = await self._billing.finish(
                tenant,
                request,
                attempt,
                warm,
                end_chunk,
                answer.content(),
                baseline,
                head,
                window,
                open_call,
                lookup.lease_id if lookup is not None and lookup.leader else "",
                warm_call,
                late_bill,
            )
            finished = True
            ended = end
            if answer_billed is not None:
                answer_billed(end)  # billed: counted even if its caller leaves before the end
            spans.outcome_attributes(root, end)
            if not answer.blocks or not streamed:  # no start went out: it goes with the end
                yield pb.CompleteChunk(start=head)
            yield pb.CompleteChunk(end=end)
        except Silent as exc:
            log.warning(
                "replica %s of %s silent mid-answer for %.1f s: cut",
                attempt.replica,
                attempt.model.id,
                exc.silent_s,
            )
            raise ReplicaCut(
                attempt.replica,
                f"the {attempt.model.id} replica went silent mid-answer (nothing for "
                f"{exc.silent_s:.1f} s: hung) and was cut; billed for what was produced, not "
                "cached; retry with the same request_id",
            ) from exc
        except CallFailed as exc:
            if exc.code == Code.DEADLINE_EXCEEDED and not attempt.routers_deadline:
                # the request's own deadline, sooner than the router's: the client's choice,
                # no fault of the replica (nor counted toward its ejection); its access line
                # says "deadline":"client"
                log.debug(
                    "the request's own deadline (%.1f s) passed mid-answer on replica %s of %s",
                    attempt.timeout_s,
                    attempt.replica,
                    attempt.model.id,
                )
            else:
                log.warning("replica %s failed mid-answer: %s", attempt.replica, exc.code.name)
            if exc.code == Code.DEADLINE_EXCEEDED:
                if attempt.cut_before_first_token and _another_has_time(attempt, window.deadline):
                    # (its end came too late)
                    raise _cut_unstarted(attempt, _answer_outlasted(attempt, None)) from exc
                raise _answer_outlasted(attempt, None) from exc
            raise ReplicaCut(
                attempt.replica,
                f"the {attempt.model.id} model failed mid-answer ({exc.code.name}); retry "
                "with the same request_id",
            ) from exc
        finally:
            ahead.close()
            if watch is not None:
                watch.close()
            if not finished:
                attempt.stream.cancel()
            if not attempt.released:  # no end came (cut, failed, or its caller left before)
                self._released(attempt, self._clock(), None)
            error = sys.exc_info()[1]
            error_type = "" if ended is not None else _error_type(error)
            if error_type:
                spans.chat_failed(attempt.chat_span, error_type)
            self._judged(attempt, finished, error)
            seconds = self._clock() - attempt.opened_at
            if ended is not None and attempt.late is not None:
                self._billing.trace_late_bill(attempt, request, attempt.late, root, seconds)
            elif ended is not None:
                attempt.chat_span.end()
                self._billing.count_model_call(attempt, ended.usage, seconds, error_type)
            if not finished:
                # Cancelled or cut after the prefill: bill what the provider would bill (the
                # prompt and the tokens produced so far, those its caller did not take too;
                # to the outbox if prefix-cache is down), never store. Its span and GenAI
                # metrics wait for that bill.
                if end_chunk is not None and answer.partial_usage is None:
                    _ended(answer, end_chunk)  # taken, then the caller left before the bill
                for left in ahead.left():
                    _untaken(answer, left)
                billed = self._billing.bill_partial(
                    tenant, request, attempt, answer, baseline, warm_call, charge, window, open_call
                )
                self._billing.trace_bill(attempt, request, billed, seconds, error_type, unanswered)
                if bills is not None:
                    bills.append(billed)

    def _arrived(
        self, attempt: Attempt, open_call: OpenCall, chunk: model_pb2.GenerateChunk, at: float
    ) -> None:
        """A chunk of ``attempt``'s answer came (``ReadAhead``), whenever its caller takes it:
        journalled as produced (a router killed meanwhile bills it), and a sign of life, so a
        call waiting behind this answer there is not stalled (a `progress` chunk is nothing
        else: a piece of a tool call its replica holds, or of the model's thinking); the end
        at the deadline of a call cut before its first token is none."""
        part = chunk.WhichOneof("part")
        if part == "text" or part == "block":
            # a block's pieces are in the model service's running count already
            open_call.produced(_output_text(chunk), after_count=part == "text")
        elif part == "progress":
            open_call.progressed(chunk.progress.output_tokens)
        if not attempt.cut_before_first_token:
            self.loads.progressed(attempt.replica, at)
        if part == "end":  # the model is done: its slot is free, whenever its caller reads it
            whole = not chunk.end.interrupted
            self._released(attempt, at, chunk.end.output_tokens if whole else None)

    def _released(self, attempt: Attempt, at: float, output_tokens: int | None) -> None:
        """``attempt``'s call no longer holds its replica's slot (once): its end came at
        ``at`` (``output_tokens``: a whole answer's, a measure of its decode), or it ended
        without one."""
        if not attempt.released:
            attempt.released = True
            self.loads.ended(attempt.replica, attempt.ticket, at, output_tokens)

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

    def _judged(self, attempt: Attempt, finished: bool, error: BaseException | None) -> None:
        """The call's verdict on its replica's health (``replica_health``): a cut counts
        against it, also after its first token (a replica that cuts every answer there is
        ejected); only a whole answer brings it back; a caller that left, or an answer that
        outlasted its deadline, says nothing. A call cut before its first token, after its
        provider reported the prompt, was judged when its start came (``Dispatcher``)."""
        if attempt.cut_before_first_token:
            return
        health = self._dispatch.health(attempt.model.id)
        if isinstance(error, ReplicaCut):
            self._dispatch.replica_failed(attempt.model.id, attempt.replica, attempt.probe)
        elif finished:
            health.succeeded(attempt.replica)
        else:
            health.released(attempt.replica, attempt.probe)

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
            accepted_tiers=self._accepted_tiers(request),
            retry=retried,
        )

    def _accepted_tiers(self, request: pb.CompleteRequest) -> list[str]:
        """The answer tiers an ``auto`` request accepts from L1 ([] = any): from the cheapest
        one its thresholds can reach up. L1's scope holds ``auto``, not the thresholds: a
        retry with ``routing.threshold`` -1 ("the large model, please") would get the small
        tier's answer again, billed as a saving. L1 refuses such a hit, as the miss it is."""
        if request.model != AUTO:
            return []
        tiers = self._table.tiers
        lowest = self._router.lowest_tier(request)
        if lowest == tiers[0]:
            return []
        return list(tiers[tiers.index(lowest) :])

    def _below_lowest_tier(
        self, request: pb.CompleteRequest, lookup: semantic_cache_pb2.LookupResponse | None
    ) -> str:
        """Why L1's hit for an ``auto`` request is not served ("" = it is, or no hit): its
        answer's tier is not one the request accepts (``_accepted_tiers``), which L1 did not
        refuse itself (one older than ``accepted_tiers``)."""
        if lookup is None or not lookup.hit:
            return ""
        accepted = self._accepted_tiers(request)
        tier = lookup.answer.tier
        if not accepted or tier in accepted:
            return ""
        return f"{_TIER_REFUSAL} the cached answer is the {tier} tier's; the request accepts " + (
            ", ".join(accepted)
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


def _untaken(answer: Answer, chunk: model_pb2.GenerateChunk) -> None:
    """A chunk the model produced that the caller did not take (it left, or the answer was
    cut meanwhile): in the answer's count, for its bill."""
    part = chunk.WhichOneof("part")
    if part == "text" or part == "block":
        answer.add(chunk)
    elif part == "progress":
        answer.progressed(chunk.progress)
    elif part == "end":  # the model's end came, read ahead: its count and report are the bill
        _ended(answer, chunk.end)


def _ended(answer: Answer, end: model_pb2.GenerateEnd) -> None:
    """The model's ``end`` of a call billed without its answer (interrupted, or its caller
    left after the end came): the provider's report and its model service's count bill it
    (``Billing.bill_partial``), not the router's count of the text."""
    answer.partial_usage = end.provider_usage
    answer.partial_output_tokens = end.output_tokens


def _output_text(chunk: model_pb2.GenerateChunk) -> str:
    """What of an answer's chunk is output tokens: its text, or a tool call's name and input
    (as ``Answer.tool_text``); a block of another kind counts nothing."""
    if chunk.WhichOneof("part") == "text":
        return chunk.text
    if chunk.block.WhichOneof("kind") == "tool_use":
        return chunk.block.tool_use.name + chunk.block.tool_use.input_json
    return ""


def _headed(head: pb.CompleteResponse, model: ModelSpec, warm: CommitReply) -> None:
    """The start's model, tier and serving layer, and the prompt's split as the WARM commit
    priced it (the end's usage is the bill: a provider's report may still correct it). Clients
    read a prompt's input tokens at the start, as Anthropic's message_start gives them."""
    head.model = model.id
    head.tier = model.tier
    head.served_by = served_by(model, warm.usage.cache_read_input_tokens if warm else 0)
    if warm is not None:
        head.usage.input_tokens = warm.usage.input_tokens
        head.usage.cache_creation_input_tokens = warm.usage.cache_creation_input_tokens
        head.usage.cache_read_input_tokens = warm.usage.cache_read_input_tokens
        if warm.usage.HasField("cache_creation"):
            head.usage.cache_creation.CopyFrom(warm.usage.cache_creation)


def _lookup_result(lookup: semantic_cache_pb2.LookupResponse) -> str:
    if lookup.hit:
        return f"hit ({'exact' if lookup.match.exact else 'paraphrase'})"
    if lookup.skip_reason:
        return "skipped"
    return "pending" if lookup.pending else f"miss (best similarity {lookup.best_similarity:.3f})"


def _error_type(exc: BaseException | None) -> str:
    """A failed model call's ``error.type`` (a closed set: a label of the GenAI metrics)."""
    if isinstance(exc, ReplicaCut):
        return "replica_cut"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    if isinstance(exc, RequestError):
        return exc.code.name
    return "_OTHER"  # the conventions' value for an error of no known type


def chunks_of(end: pb.CompleteResponse) -> list[pb.CompleteChunk]:
    """A finished answer (an L1 hit, a ledger's replay) as the Gateway streams it: start, one
    delta a block, end. The start tells the prompt's usage, as a model answer's does
    (``_headed``): a client reads the input tokens at the start (Anthropic's message_start)."""
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
