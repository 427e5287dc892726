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
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, prefix_cache_pb2, semantic_cache_pb2
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
from services.router.calls import Calls, PrefixWindow, warm_commit
from services.router.dependencies import CallFailed, Dependencies
from services.router.dispatch import Attempt, Dispatcher, Silent
from services.router.metrics import RouterMetrics, decision_reason
from services.router.open_calls import OpenCall
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import JournalError
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


def _kv_cached(attempt: Attempt, usage: prefix_cache_pb2.ProviderUsage | None) -> int:
    """The call's KV reuse: its start's, or, when the start could not tell it (a provider
    adapter), a self-hosted engine's reported ``prompt_tokens_details.cached_tokens``."""
    engine = attempt.start.kv_cached_unreported and attempt.model.provider == "self_hosted"
    if engine and usage is not None and usage.WhichOneof("report") == "openai":
        return usage.openai.prompt_tokens_details.cached_tokens
    return attempt.start.kv_cached_tokens


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


CommitReply = prefix_cache_pb2.CommitResponse | None


class Charge(Protocol):
    """Told of a model call billed without its answer: its usage and cost in nano-dollars (0
    for a bill kept in the outbox: the outbox counted its estimate as it journalled it)."""

    def __call__(self, usage: pb.Usage, cost_nanos: int, /) -> None: ...


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
# told, before its end goes out, the bill to come of an answer that goes at the router's
# estimate because its FINAL (sent under the router's own ROUTER_PREFIX_TIMEOUT_S) had not
# answered by the time the caller's deadline let the answer wait: the answer's end as billed
# (prefix-cache's bill; the estimate, marked so, when the FINAL failed and the outbox kept it)
LateBill = Callable[[asyncio.Future[pb.CompleteResponse]], None]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Bill:
    """What a model call that ended without its answer (cancelled, or cut before a retry) was
    billed: prefix-cache's FINAL, or the estimate at base prices when it went to the outbox."""

    usage: pb.Usage
    cost: pb.Cost


# a request's bills of such calls, each known once its FINAL is (None: it could not be kept)
Bills = list[asyncio.Future[Bill | None]]

_NO_STORE = (pb.SEMANTIC_MODE_BYPASS, pb.SEMANTIC_MODE_NO_STORE)
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
        at the router's estimate before its FINAL answered (``_bill_answer``); the answer's
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
        the background (``_bill_partial``), its bill added to ``unanswered``. ``window``: the
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
        written = self._open(tenant, request, attempt, baseline, first_warm, open_call)
        warm_call: asyncio.Future[CommitReply] = asyncio.ensure_future(
            self._warm_once_written(
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
            end = await self._finish(
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
                self._trace_late_bill(attempt, request, attempt.late, root, seconds)
            elif ended is not None:
                attempt.chat_span.end()
                self._model_call(attempt, ended.usage, seconds, error_type)
            if not finished:
                # Cancelled or cut after the prefill: bill what the provider would bill (the
                # prompt and the tokens produced so far, those its caller did not take too;
                # to the outbox if prefix-cache is down), never store. Its span and GenAI
                # metrics wait for that bill.
                if end_chunk is not None and answer.partial_usage is None:
                    _ended(answer, end_chunk)  # taken, then the caller left before the bill
                for left in ahead.left():
                    _untaken(answer, left)
                billed = self._bill_partial(
                    tenant, request, attempt, answer, baseline, warm_call, charge, window, open_call
                )
                self._trace_bill(attempt, request, billed, seconds, error_type, unanswered)
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

    async def _finish(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        warm: prefix_cache_pb2.CommitResponse | None,
        end_chunk: model_pb2.GenerateEnd,
        content: list[pb.ContentBlock],
        baseline: ModelSpec,
        head: pb.CompleteResponse,
        window: PrefixWindow,
        open_call: OpenCall | None = None,
        lease_id: str = "",
        warm_call: asyncio.Future[CommitReply] | None = None,
        late_bill: LateBill | None = None,
    ) -> pb.CompleteResponse:
        """``lease_id``: the L1 lease this request's Lookup took ("" = it did not lead), which
        its Store names, so that L1 ends that lease only (not one another request took since
        this one's aged out). ``warm_call``: the call's WARM, with which its FINAL goes under
        the router's own timeout (``_bill_answer``; None: under the request's ``window``).
        ``late_bill``: as ``run``'s."""
        usage = end_chunk.provider_usage if end_chunk.HasField("provider_usage") else None
        if usage is not None and not usage.WhichOneof("report"):
            usage = None
        # with a provider's report, its count (prefix-cache refuses a FINAL that differs);
        # the model service's end carries that count
        output_tokens = end_chunk.output_tokens if usage is None else _reported_output(usage)
        final, sent = await self._bill_answer(
            tenant,
            request,
            attempt,
            output_tokens,
            baseline.id,
            usage,
            window,
            open_call,
            warm_call,
        )
        if final is not None:
            spans.reconciled(trace.get_current_span(), final)
        if request.cache.semantic not in _NO_STORE and last_user_text(request) is not None:
            answer = semantic_cache_pb2.CachedAnswer(
                content=content,
                model=attempt.model.id,
                tier=attempt.model.tier,
                stop_reason=end_chunk.stop_reason,
                output_tokens=output_tokens,
            )
            # Once its bill is made or kept (an answer refused for its bill is a failed call:
            # never stored), or, for an answer that goes at its estimate before its FINAL
            # answered (``sent``), once it goes: it is refused for nothing after, and holding
            # the Store (the lease an identical request waits on) for a bill that may take
            # ROUTER_PREFIX_TIMEOUT_S would only delay those requests. The answer does not
            # wait for its Store (half a miss's latency: the embedding).
            # An identical request arriving meanwhile waits on this one's lease, which the
            # Store ends, and is served the stored answer; shutdown drains the Store.
            store = self._calls.store(tenant, request, answer, lease_id)
            self._stores.add(self._in_background(store))
        end = pb.CompleteResponse()
        end.CopyFrom(head)
        end.content.extend(content)
        end.stop_reason = end_chunk.stop_reason
        if final is not None:
            _with_bill(end, final, attempt.model)
        else:
            # prefix-cache unreachable: the engine's prompt count at the base prices, no cache
            # discount claimed, marked estimated; the outbox bills it when prefix-cache is back.
            if warm is not None:
                end.usage.CopyFrom(warm.usage)
            else:
                end.usage.input_tokens = attempt.start.prompt_tokens
            end.usage.output_tokens = output_tokens
            reused = _kv_cached(attempt, usage)
            if attempt.model.rules == "self_hosted":
                # the engine's KV cache is shared by every tenant: tell at most the reuse the
                # WARM found this tenant's own traffic left there (none without a WARM)
                own = warm.usage.cache_read_input_tokens if warm is not None else 0
                reused = min(reused, own)
            end.usage.kv_cached_tokens = reused
            prompt = attempt.start.prompt_tokens
            cost = attempt.model.baseline_nanos(prompt, output_tokens)
            base = baseline.baseline_nanos(prompt, output_tokens)
            end.cost.CopyFrom(
                pb.Cost(
                    cost_nanos=cost, baseline_nanos=base, saved_nanos=base - cost, estimated=True
                )
            )
        end.usage.draft_accepted_tokens = end_chunk.draft_accepted_tokens
        end.usage.reasoning_tokens = end_chunk.reasoning_tokens
        spans.end_chat_span(attempt.chat_span, request, end)
        if sent is not None:  # the answer goes at the estimate; its bill comes after it
            estimate = pb.CompleteResponse()
            estimate.CopyFrom(end)
            bill = self._late_bill(
                tenant,
                request,
                attempt,
                output_tokens,
                baseline.id,
                usage,
                open_call,
                sent,
                estimate,
            )
            late = self._in_background(bill)
            attempt.late = late
            if late_bill is not None:
                late_bill(late)
        return end

    async def _bill_answer(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        output_tokens: int,
        baseline_id: str,
        usage: prefix_cache_pb2.ProviderUsage | None,
        window: PrefixWindow,
        open_call: OpenCall | None,
        warm_call: asyncio.Future[CommitReply] | None,
    ) -> tuple[
        prefix_cache_pb2.CommitResponse | None,
        asyncio.Future[prefix_cache_pb2.CommitResponse | None] | None,
    ]:
        """The FINAL of a whole answer, sent under the router's own ``ROUTER_PREFIX_TIMEOUT_S``
        and breaker, as the bill of a call that ended early is (``_billing_window``): not under
        what the caller's deadline leaves, which, short once the answer is whole, timed the
        FINAL out and sent the bill to the outbox at the router's estimate (corrected a replay
        later). The answer waits for it as long as it did when the FINAL had that share of the
        caller's deadline (``prefix_timeout_s``), no longer: then (the FINAL, None when it was
        not made, and None) the answer carries prefix-cache's bill, or the outbox's estimate
        when prefix-cache failed it (kept before the answer goes, as any bill prefix-cache
        does not take). Past it (None and the FINAL still running) the answer goes at the
        estimate and its bill follows (``_late_bill``). A FINAL prefix-cache's own state skips
        (an earlier call of the request timed out, or its breaker is open) goes to the outbox
        at once, as before; so does one without ``warm_call``."""
        if warm_call is None or self._calls.prefix_faulted(window):
            final = await self._commit_final(
                tenant, request, attempt, output_tokens, baseline_id, usage, window, open_call
            )
            return final, None
        # the answer's wait, as it was: the FINAL's share of the caller's deadline; when that
        # is the router's own limit, the FINAL's own timeout bounds it (no race with it)
        # (asked without the breaker: its half-open trial is the FINAL's own)
        share_s = 0.0 if window.off else self._calls.prefix_share_s(window)
        waits_s = share_s if share_s < self._calls.prefix_share_s() else None

        async def send() -> prefix_cache_pb2.CommitResponse | None:
            own = await self._billing_window(tenant, request, attempt, warm_call, window)
            try:
                return await self._send_final(
                    tenant, request, attempt, output_tokens, baseline_id, usage, own
                )
            finally:  # a timeout of its own ends the request's calls, as one of the window's
                if own.off:
                    window.turned_off(own.clients)
                window.counted |= own.counted

        sent = self._in_background(send())
        try:
            if waits_s is None or waits_s > 0:
                await asyncio.wait((sent,), timeout=waits_s)
            if not sent.done() and open_call is not None:
                # the answer's bill, whole, journalled and fsynced before the answer goes (as
                # the outbox would have kept it): a router killed, or its host crashed, before
                # the FINAL's reply bills it whole at its next start
                line = _final(tenant, request, attempt, output_tokens, baseline_id, usage)
                await self._written_in_time(open_call.answered(line), window)
        except asyncio.CancelledError:
            sent.cancel()  # its caller left: the call's bill without its answer sends it
            raise
        if not sent.done():
            return None, sent
        final = sent.result()
        if final is not None:
            if open_call is not None:
                open_call.settled(final_made=True)
            return final, None
        await self._keep(tenant, request, attempt, output_tokens, baseline_id, usage, open_call)
        return None, None

    async def _written_in_time(self, written: asyncio.Future[None], window: PrefixWindow) -> None:
        """Waits for an answer's journal line to be fsynced (``written``), no longer than the
        request's deadline leaves: a slow or hung disk made the answer, whole and paid for,
        miss its caller's deadline (an fsync of 0.5 s: the caller had no end). Past it the
        answer goes: its line is in the file (a killed router bills it; a host crash in that gap
        loses it), and the late sync is told. A failed write is logged by the journal."""
        written.add_done_callback(_retrieved)
        if written.done():  # (no journal: nothing to wait for, not even a turn of the loop)
            return
        left_s = None if window.deadline is None else max(window.deadline - self._clock(), 0.0)
        await asyncio.wait((written,), timeout=left_s)
        if not written.done():
            log.warning(
                "an answer went before its bill's journal line was synced to disk (the disk "
                "is slow: %.3f s of the request's deadline were left); a host crash now would "
                "lose that bill",
                left_s or 0.0,
            )

    async def _late_bill(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        output_tokens: int,
        baseline_id: str,
        usage: prefix_cache_pb2.ProviderUsage | None,
        open_call: OpenCall | None,
        sent: asyncio.Future[prefix_cache_pb2.CommitResponse | None],
        estimate: pb.CompleteResponse,
    ) -> pb.CompleteResponse:
        """The end of an answer that went at the router's ``estimate`` as billed, once its
        FINAL (``sent``) is answered: prefix-cache's bill; or, when prefix-cache failed it,
        ``estimate`` with its bill kept in the outbox (counted at that estimate as its line
        is written, corrected by the replay, as any bill prefix-cache does not take). Until
        the answer's FINAL is made or kept its open call stays journalled (a router killed
        meanwhile has it billed at its next start)."""
        try:
            final = await sent
        except Exception as exc:  # a fault past prefix-cache's failures, which give None
            log.error("the FINAL of %s failed: %s", attempt.commit_key(request.request_id), exc)
            final = None
        if final is not None:
            if open_call is not None:
                open_call.settled(final_made=True)
            billed = pb.CompleteResponse()
            billed.CopyFrom(estimate)
            _with_bill(billed, final, attempt.model)
            return billed
        try:
            await self._keep(tenant, request, attempt, output_tokens, baseline_id, usage, open_call)
        except RequestError:  # neither sent nor kept, its answer gone: never silent
            log.error(
                "billing outbox: the bill of %s (tenant %s, estimated cost_nanos=%d), an answer "
                "served at its estimate, could be neither sent nor kept: lost",
                attempt.commit_key(request.request_id),
                tenant,
                estimate.cost.cost_nanos,
            )
            if self._metrics is not None:
                self._metrics.outbox_dropped(1)
        return estimate

    def _bill_partial(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        answer: Answer,
        baseline: ModelSpec,
        warm_call: asyncio.Future[CommitReply],
        charge: Charge | None,
        window: PrefixWindow,
        open_call: OpenCall | None = None,
    ) -> asyncio.Future[Bill | None]:
        """The FINAL of a call that ended early, in the background once its WARM is done;
        then the money metrics count it (``served_by="unanswered"``) and ``charge`` is told
        its tokens and what it cost (prefix-cache's price; nothing when the FINAL went to the
        outbox, which counted its estimate as it journalled it). Returns the bill to come. No
        one waits for it: not bounded by the request's deadline, only skipped (to the outbox)
        when one of the request's prefix-cache calls timed out or was skipped (``window``) for
        a fault of prefix-cache's; not when the request's own deadline cut one short or left it
        no time (``_billing_window``)."""
        usage = answer.partial_usage
        tokenizer = self._tokenizers.for_spec(attempt.model)  # the row's vocabulary
        output_tokens = sum(
            tokenizer.count(text) for text in (answer.text(), answer.tool_text()) if text
        )
        reported = usage if usage is not None and usage.WhichOneof("report") else None
        if reported is not None:
            # the provider's report, which prefix-cache reconciles the FINAL against (a FINAL
            # whose output count differs is refused): its count (OpenAI's completion_tokens,
            # in the engine's own vocabulary; Anthropic's, the model service's count)
            output_tokens = _reported_output(reported)
        elif usage is not None:
            # a provider's stream that broke: its model service counted what the router never
            # saw whole (a tool call cut in its arguments, the model's thinking)
            output_tokens = max(output_tokens, answer.partial_output_tokens)
        elif answer.progress_tokens:
            # cut by the router or left by its caller, no end: the model service's last running
            # count (the same things), and the text received after it
            since = "".join(answer.text_since_progress)
            counted = answer.progress_tokens + (tokenizer.count(since) if since else 0)
            output_tokens = max(output_tokens, counted)

        async def bill() -> Bill | None:
            final: prefix_cache_pb2.CommitResponse | None = None
            try:
                if attempt.kept_output_tokens is None:  # else the journal holds its bill
                    own = await self._billing_window(tenant, request, attempt, warm_call, window)
                    final = await self._commit_final(
                        tenant,
                        request,
                        attempt,
                        output_tokens,
                        baseline.id,
                        reported,
                        own,
                        open_call,
                    )
            except RequestError:
                if attempt.kept_output_tokens is None:
                    # neither sent nor kept (the outbox keeps what it cannot write in memory:
                    # this is a fault past that): never silent
                    estimate = attempt.model.baseline_nanos(
                        attempt.start.prompt_tokens, output_tokens
                    )
                    log.error(
                        "billing outbox: the bill of %s (tenant %s, estimated cost_nanos=%d), "
                        "a model call ended without its answer, could be neither sent nor "
                        "kept: lost",
                        attempt.commit_key(request.request_id),
                        tenant,
                        estimate,
                    )
                    if self._metrics is not None:
                        self._metrics.outbox_dropped(1)
                    raise
            finally:
                if open_call is not None:  # not settled nor replaced: the replay bills it
                    open_call.settled(final_made=False)
            if final is not None:
                billed = Bill(final.usage, final.cost)
            else:
                # the estimate the outbox keeps it at, which its replay corrects the budgets by
                tokens = attempt.kept_output_tokens
                produced = output_tokens if tokens is None else tokens
                prompt = attempt.start.prompt_tokens
                cost = attempt.model.baseline_nanos(prompt, produced)
                base = baseline.baseline_nanos(prompt, produced)
                billed = Bill(
                    pb.Usage(input_tokens=prompt, output_tokens=produced),
                    pb.Cost(
                        cost_nanos=cost,
                        baseline_nanos=base,
                        saved_nanos=base - cost,
                        estimated=True,
                    ),
                )
            if self._metrics is not None:
                self._metrics.unanswered(tenant, billed.usage, billed.cost)
            if charge is not None:
                # a bill kept in the outbox: its estimate counted as its line was written
                charge(billed.usage, billed.cost.cost_nanos if final is not None else 0)
            return billed

        return self._in_background(_after(warm_call, bill))

    async def _billing_window(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        warm_call: asyncio.Future[CommitReply],
        window: PrefixWindow,
    ) -> PrefixWindow:
        """The prefix-cache calls of the bill of a call that ended early (its caller gone, or
        the call cut), or of a whole answer (``_bill_answer``), made once its WARM is done: no
        deadline (the caller's bounds nothing now), and off as the request's were, unless only
        the request's own deadline turned them off (``clients``: a short deadline cut its Plan
        or WARM). Then the bill goes to
        prefix-cache under the router's own ``ROUTER_PREFIX_TIMEOUT_S``, and its breaker, like
        any bill: its WARM first, again with the request, when the first was not made or not
        answered (a no-op if prefix-cache recorded it); to the outbox only if prefix-cache
        fails them. Kept, the bill was counted at the router's estimate at base prices, which
        prices a cached prompt as uncached input (a review measured one cut call's estimate
        at 9.4x its bill)."""
        if not (window.off and window.clients):
            return PrefixWindow(off=window.off, clients=window.clients)
        own = PrefixWindow()
        warm = None
        if warm_call.done() and not warm_call.cancelled() and warm_call.exception() is None:
            warm = warm_call.result()
        if warm is None:
            await self._calls.commit_warm(_replay_warm(tenant, request, attempt), request, own)
        return own

    def _trace_bill(
        self,
        attempt: Attempt,
        request: pb.CompleteRequest,
        bill: asyncio.Future[Bill | None],
        seconds: float,
        error_type: str,
        unanswered: spans.UnansweredBills | None,
    ) -> None:
        """A call that ended early, once ``bill`` is known: its ``chat <model>`` span, held
        open until then, gets the bill's usage and cost and ends at the time the call ended
        (now); ``unanswered`` adds the bill (the request's span, if still open); the GenAI
        metrics count the call (``seconds``, ``error_type``) with the billed tokens. Also when
        the bill failed or was cancelled (a forced shutdown): the span ends without it."""
        ended_ns = time.time_ns()  # the spans' clock

        def billed(_: asyncio.Future[Bill | None]) -> None:
            known = None
            if not bill.cancelled() and bill.exception() is None:
                known = bill.result()
            if known is not None:
                spans.chat_billed(attempt.chat_span, request, known.usage, known.cost)
                if unanswered is not None:
                    unanswered.add(known.cost.cost_nanos)
            attempt.chat_span.end(end_time=ended_ns)
            self._model_call(
                attempt, known.usage if known is not None else None, seconds, error_type
            )

        bill.add_done_callback(billed)

    def _trace_late_bill(
        self,
        attempt: Attempt,
        request: pb.CompleteRequest,
        late: asyncio.Future[pb.CompleteResponse],
        root: trace.Span,
        seconds: float,
    ) -> None:
        """A whole answer that went at the router's estimate, once its bill (``late``) is
        known: its ``chat <model>`` span, held open until then, gets the bill's usage and cost
        and ends at the time the answer ended (now); the request's span (``root``), if still
        open (the Gateway's waits for the bill: ``access_log.Call.late_bill``), gets the
        bill's outcome, and either says the bill came after the answer
        (``cachemesh.billed_after_answer``); the GenAI metrics count the billed tokens. Also
        when the bill failed or was cancelled (a forced shutdown): the spans keep the
        estimate."""
        ended_ns = time.time_ns()  # the spans' clock
        span = attempt.chat_span

        def billed(_: asyncio.Future[pb.CompleteResponse]) -> None:
            known = None
            if not late.cancelled() and late.exception() is None:
                known = late.result()
            if known is not None:
                spans.chat_billed(span, request, known.usage, known.cost)
                if root.is_recording():
                    spans.outcome_attributes(root, known)
                    root.set_attribute("cachemesh.billed_after_answer", True)
            if span.is_recording():
                span.set_attribute("cachemesh.billed_after_answer", True)
            span.end(end_time=ended_ns)
            self._model_call(attempt, known.usage if known is not None else None, seconds, "")

        late.add_done_callback(billed)

    def _model_call(
        self, attempt: Attempt, usage: pb.Usage | None, seconds: float, error_type: str
    ) -> None:
        """The GenAI client metrics of a model call (``usage`` what it was billed)."""
        if self._metrics is not None:
            self._metrics.model_call(
                spans.PROVIDER_NAMES.get(attempt.model.provider, attempt.model.provider),
                attempt.model.id,
                attempt.model.id,
                usage,
                seconds,
                error_type,
            )

    async def _commit_final(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        output_tokens: int,
        baseline_id: str,
        usage: prefix_cache_pb2.ProviderUsage | None,
        window: PrefixWindow,
        open_call: OpenCall | None = None,
    ) -> prefix_cache_pb2.CommitResponse | None:
        """FINAL; when prefix-cache does not acknowledge it (or it is not sent: ``window``),
        the outbox keeps the commits (durably, before the answer is sent) and bills them once
        prefix-cache is back. Either settles the call's ``open_call`` (cancelled before: it is
        left to the next FINAL, or to the next start of the router)."""
        final = await self._send_final(
            tenant, request, attempt, output_tokens, baseline_id, usage, window
        )
        if final is not None and open_call is not None:
            open_call.settled(final_made=True)
        if final is None:
            await self._keep(tenant, request, attempt, output_tokens, baseline_id, usage, open_call)
        return final

    async def _send_final(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        output_tokens: int,
        baseline_id: str,
        usage: prefix_cache_pb2.ProviderUsage | None,
        window: PrefixWindow,
    ) -> prefix_cache_pb2.CommitResponse | None:
        """The answer's FINAL, sent under ``window`` (None: not acknowledged, or not sent)."""
        return await self._calls.commit_final(
            tenant,
            request,
            attempt.commit_key(request.request_id),
            attempt.model.id,
            attempt.replica,
            output_tokens,
            _kv_cached(attempt, usage),
            baseline_id,
            usage,
            window,
        )

    async def _keep(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        output_tokens: int,
        baseline_id: str,
        usage: prefix_cache_pb2.ProviderUsage | None,
        open_call: OpenCall | None,
    ) -> None:
        """The commits of a FINAL prefix-cache did not acknowledge (or that was not sent), kept
        in the outbox (durably) at the router's estimate, which its replay bills; without an
        outbox, nothing. ``RequestError`` when it cannot be kept at all."""
        key = attempt.commit_key(request.request_id)
        if self._outbox is not None:
            # the WARM again, with the request: a no-op if the first one was recorded; else it
            # records the prompt with the read the call's Plan predicted on arrival and the
            # arrival's time (the provider looked its cache up then): a prefix that was warm is
            # billed as the read it was, never as a write (1.25x / 2x where the read is 0.1x),
            # however long the outage (the prefix expired since) and across a prefix-cache
            # restart (its warm state lost), and its lifetime runs from the arrival. The
            # answer's estimate claimed no discount, so a read bills at most that estimate.
            replay_warm = _replay_warm(tenant, request, attempt)
            replay_final = _final(tenant, request, attempt, output_tokens, baseline_id, usage)
            opened = open_call.entry if open_call is not None else None
            written = False  # its line in the journal, in place of the open call's
            try:
                estimate = attempt.model.baseline_nanos(attempt.start.prompt_tokens, output_tokens)
                # counted against the budgets as its line is written (the outbox's)
                await self._outbox.keep([replay_warm, replay_final], estimate, opened)
                written = True
            except JournalError as exc:
                written = exc.written
                if not exc.written:
                    log.error("billing outbox: %s; the answer to %s is refused", exc, key)
                    raise RequestError(
                        Code.UNAVAILABLE,
                        "prefix-cache did not take this answer's bill and the router's billing "
                        "outbox cannot keep it (a disk fault on this router, in its log); "
                        "retry with the same request_id",
                    ) from exc
                # kept all the same (a line not fsynced, or held in memory while the disk is
                # full): billed once if the router lives, as an outbox without ROUTER_DATA_DIR
                # bills. The caller pays for this answer, so it gets it (refused, it was billed
                # for nothing and its retry was a second model call and a second bill).
                attempt.kept_output_tokens = output_tokens
                log.error(
                    "billing outbox: %s; the answer to %s is served, its bill kept but not "
                    "durably (lost if the router stops before prefix-cache or the journal "
                    "takes it)",
                    exc,
                    key,
                )
            finally:
                # the entry the outbox replays is now the kept one; else (not written, or the
                # request cancelled meanwhile) the call's bill without its answer sends the
                # FINAL again or keeps it in its place (one entry: the open call's id), and
                # leaves it to the replay only when that fails too (``_bill_partial``)
                if open_call is not None and written:
                    open_call.settled(final_made=False)
            record_event(self._tracer, "cachemesh.billing_deferred", {"commit": key})

    def _open(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        baseline: ModelSpec,
        warm: prefix_cache_pb2.CommitRequest,
        open_call: OpenCall,
    ) -> asyncio.Future[None]:
        """Journals the call's open call: its ``warm`` as it will be sent and its FINAL. The
        future is set once the line is in the journal's file."""
        # without a Plan the WARM carries the request: the FINAL alone
        journalled = warm if warm.plan_id else None
        return open_call.open(journalled, _final(tenant, request, attempt, 0, baseline.id, None))

    async def _warm_once_written(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        attempt: Attempt,
        warm: prefix_cache_pb2.CommitRequest,
        open_call: OpenCall,
        written: asyncio.Future[None],
        window: PrefixWindow,
    ) -> CommitReply:
        """The call's ``warm`` commit once its open call is in the journal's file (not fsynced:
        it survives this process being killed, which a WARM must not outlive unjournalled);
        when prefix-cache does not acknowledge it, the open call carries it as a replay sends
        it, with the request."""
        with contextlib.suppress(Exception):  # a failed write is logged; the call goes on
            await written
        reply = await self._calls.commit_warm(warm, request, window, attempt.planned_at_ms)
        if reply is None:
            open_call.warm_lost(_replay_warm(tenant, request, attempt))
        return reply

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


async def _after(first: asyncio.Future[CommitReply], then: Callable[[], Awaitable[_T]]) -> _T:
    """``then()`` once ``first`` has ended, whatever its outcome: a WARM prefix-cache could
    not take is degraded already, and the FINAL's outbox replays the WARM then. Shielded, so
    cancelling this (a forced shutdown) does not cancel the WARM too."""
    try:
        await asyncio.shield(first)
    except Exception:
        log.exception("the WARM commit of a call that ended early failed; billing its FINAL")
    return await then()


def _replay_warm(
    tenant: str, request: pb.CompleteRequest, attempt: Attempt
) -> prefix_cache_pb2.CommitRequest:
    """The call's WARM as a replay sends it: with the request, the read its Plan predicted
    and the Plan's time, or without a Plan the router's time of the call (a no-op if the
    first WARM was recorded)."""
    warm = prefix_cache_pb2.CommitRequest(
        tenant=tenant,
        request_id=attempt.commit_key(request.request_id),
        phase=prefix_cache_pb2.COMMIT_PHASE_WARM,
        model=attempt.model.id,
        kv_cached_tokens=attempt.start.kv_cached_tokens,
        kv_cached_unreported=attempt.start.kv_cached_unreported,
        request=request,
    )
    if attempt.planned_read is not None:
        warm.max_read_tokens = attempt.planned_read
        if attempt.planned_at_ms is not None:
            warm.planned_at_ms = attempt.planned_at_ms
    elif attempt.planned_at_ms is not None:
        # no Plan: its own field, which an older prefix-cache ignores (planned_at_ms without
        # max_read_tokens it refuses, and the replay would be dropped)
        warm.arrived_at_ms = attempt.planned_at_ms
    return warm


def _final(
    tenant: str,
    request: pb.CompleteRequest,
    attempt: Attempt,
    output_tokens: int,
    baseline_id: str,
    usage: prefix_cache_pb2.ProviderUsage | None,
) -> prefix_cache_pb2.CommitRequest:
    """The call's FINAL as a replay sends it."""
    final = prefix_cache_pb2.CommitRequest(
        tenant=tenant,
        request_id=attempt.commit_key(request.request_id),
        phase=prefix_cache_pb2.COMMIT_PHASE_FINAL,
        model=attempt.model.id,
        replica=attempt.replica,
        output_tokens=output_tokens,
        kv_cached_tokens=_kv_cached(attempt, usage),
        baseline_model=baseline_id,
    )
    if usage is not None:
        final.provider_usage.CopyFrom(usage)
    return final


def _reported_output(usage: prefix_cache_pb2.ProviderUsage) -> int:
    """A provider report's output tokens, as prefix-cache reads them (``reported_usage``)."""
    if usage.WhichOneof("report") == "anthropic":
        return usage.anthropic.output_tokens
    return usage.openai.completion_tokens


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
    (``_bill_partial``), not the router's count of the text."""
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


def billed_layer(table: ModelTable, model: str, cache_read_tokens: int) -> str:
    """The name of the layer a bill of ``model`` (an id of ``table``) reading
    ``cache_read_tokens`` is served by (a replayed bill's: ``BillingOutbox``'s
    ``billed_layer``); "" for a model the table no longer has."""
    spec = table.get(model)
    return "" if spec is None else pb.Layer.Name(served_by(spec, cache_read_tokens))


def served_by(spec: ModelSpec, cache_read_tokens: int) -> pb.Layer.ValueType:
    """A model call is served by the prefix cache only when what it read from cache is a real
    prefix reuse (``ModelSpec.min_prefix_hit_tokens``): a llama.cpp engine reports the 3 tokens
    of its chat template's opening as cached on a prompt it never saw, which is no hit."""
    if cache_read_tokens >= spec.min_prefix_hit_tokens:
        return pb.LAYER_PREFIX_CACHE
    return pb.LAYER_MODEL


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


def _with_bill(
    end: pb.CompleteResponse, final: prefix_cache_pb2.CommitResponse, model: ModelSpec
) -> None:
    """``end`` carries ``final``'s bill: its usage (the answer's own draft and reasoning counts
    kept), its cost, and, when the provider's report reconciled it, the layer its cache
    served."""
    draft, reasoning = end.usage.draft_accepted_tokens, end.usage.reasoning_tokens
    end.usage.CopyFrom(final.usage)
    end.usage.draft_accepted_tokens = draft
    end.usage.reasoning_tokens = reasoning
    end.cost.CopyFrom(final.cost)
    if final.reconciled:  # the provider's report decides what its cache served
        end.served_by = served_by(model, final.usage.cache_read_input_tokens)


def _retrieved(future: asyncio.Future[None]) -> None:
    """Reads a future's outcome, so a failure already logged is not logged again as never
    retrieved."""
    if not future.cancelled():
        future.exception()
