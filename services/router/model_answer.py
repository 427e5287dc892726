"""One model call of a request in the router: its replica (``Dispatcher``), its answer read
ahead of its caller, the cuts that hand the request to another replica, and its bill
(``Billing``) once it ends, whole or not.

``ModelAnswers`` is built by the ``Pipeline`` with what it needs (the dispatcher, the tier
router, the model table, the billing, the outbox, the row tokenizers, the clock, the metrics,
the read-ahead budget); it holds no state of its own between calls.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncGenerator, Callable
from functools import partial

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, semantic_cache_pb2
from services.common.deadlines import END_MARGIN_S
from services.common.errors import Code, RequestError
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.tokens import Tokenizers
from services.router import spans
from services.router.answer import Answer
from services.router.billing import Billing, Bills, Charge, CommitReply, LateBill, served_by
from services.router.calls import PrefixWindow, warm_commit
from services.router.dependencies import CallFailed
from services.router.dispatch import Attempt, Dispatcher, Silent
from services.router.metrics import RouterMetrics, decision_reason
from services.router.open_calls import OpenCall
from services.router.outbox import BillingOutbox
from services.router.read_ahead import ReadAhead, ReadAheadBudget, ReadInTurn
from services.router.routing.router import Routed, TierRouter

log = logging.getLogger("cachemesh.router")

# How many replicas that died mid-answer one request may be handed on from.
MAX_REPLICA_RETRIES = 2

# An answer that broke off this close to its call's deadline was cut by the deadline (the
# replica's provider adapter ends it at most this long before it), not by the replica.
_DEADLINE_SLACK_S = END_MARGIN_S


def _answer_outlasted(
    attempt: Attempt,
    output_tokens: int | None,
    reported: bool = False,
    max_tokens: int | None = None,
    visible_pieces: int = 0,
) -> DeadlineCut:
    """A model call still answering at its deadline: another replica would take as long, so
    it is not retried (it is billed for what it produced, never stored). ``reported``: its
    provider reported its usage so far (Anthropic's prompt, from message_start);
    ``max_tokens``: the request's, which an answer that wrote all of it did not outlast the
    deadline by (its provider's end came late: no smaller max_tokens is advised), said only
    when its ``visible_pieces`` (its end's: each at least one provider token, a sure lower
    bound of its visible output; 0 from a replica that sends none) reach it. Not
    ``output_tokens``: it holds thinking (outside max_tokens on an R1-like row: 400 of it and
    no answer at max_tokens 16) and our tokenizer's estimate on a row whose tokenizer is not
    its provider's (a Claude answer in Hindi of 421 tokens counted 1,921), both told before
    that they had written all of their max_tokens."""
    produced = f" after {output_tokens} tokens" if output_tokens is not None else ""
    billed = "what was produced"
    if output_tokens == 0:  # its prompt was prefilled (a start came), no token yet
        produced = " before its first token"
        billed = "its prompt" + (", as the provider reported it" if reported else "")
    whole = max_tokens is not None and 0 < max_tokens <= visible_pieces
    if attempt.routers_deadline:
        whose = "the router's ROUTER_MODEL_TIMEOUT_S"
        allow = "A retry would be cut the same way; ask for a smaller max_tokens"
        if output_tokens == 0:  # no token at all: its provider stalled, max_tokens is not why
            allow = "Its provider gave no token in that time; retry later"
        elif whole:  # all of max_tokens written: its provider's end was late, not its length
            allow = (
                f"It had written all of its max_tokens ({max_tokens}) but its provider did "
                "not end it in time; retry later"
            )
    else:
        whose = "the request's deadline"
        allow = "Allow a longer deadline or a smaller max_tokens"
        if whole:
            allow = (
                f"It had written all of its max_tokens ({max_tokens}) but its provider did "
                "not end it in time; allow a longer deadline"
            )
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
# told as a model call of the request is about to be sent to a replica (its Generate): until
# the first time, the request used no model tokens, whatever ended it
ModelSent = Callable[[], None]
# told as a model call told ``ModelSent`` ended with its replica's refusal before its start (a
# status of the replica's own, not a deadline): it produced nothing and is billed nothing, so a
# request whose every model call was refused used no model tokens either
ModelRefused = Callable[[], None]


def accepted_tiers(table: ModelTable, router: TierRouter, request: pb.CompleteRequest) -> list[str]:
    """The answer tiers an ``auto`` request accepts from L1 ([] = any): from the cheapest one
    its thresholds can reach up (by ``router``). L1's scope holds ``auto``, not the thresholds:
    a retry with ``routing.threshold`` -1 ("the large model, please") would get the small
    tier's answer again, billed as a saving. L1 refuses such a hit, as the miss it is."""
    if request.model != AUTO:
        return []
    tiers = table.tiers
    lowest = router.lowest_tier(request)
    if lowest == tiers[0]:
        return []
    return list(tiers[tiers.index(lowest) :])


class ModelAnswers:
    def __init__(
        self,
        dispatch: Dispatcher,
        router: TierRouter,
        table: ModelTable,
        billing: Billing,
        outbox: BillingOutbox | None,
        tokenizers: Tokenizers,
        clock: Callable[[], float],
        metrics: RouterMetrics | None,
        read_ahead: bool,
        ahead_budget: ReadAheadBudget,
    ) -> None:
        """``dispatch`` opens each call on a replica (and keeps the replicas' loads and
        health); ``router``: the tier router of ``auto`` requests; ``billing`` bills each call;
        ``outbox``: where its open call is journalled (None: nowhere, as in the offline
        estimator). ``read_ahead``, ``ahead_budget``: a model's stream is read in a task of
        its own ahead of its caller, within the bytes all calls together may hold ahead
        (False: in the request's own task, as the ``Pipeline``'s ``read_ahead`` says)."""
        self._dispatch = dispatch
        self._loads = dispatch.loads
        self._router = router
        self._table = table
        self._billing = billing
        self._outbox = outbox
        self._tokenizers = tokenizers
        self._clock = clock
        self._metrics = metrics
        self._read_ahead = read_ahead
        self._ahead_budget = ahead_budget

    async def answer(
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
        model_sent: ModelSent | None = None,
        model_refused: ModelRefused | None = None,
        late_bill: LateBill | None = None,
    ) -> AsyncGenerator[pb.CompleteChunk, None]:
        """The model's answer as chunks; not ``streamed`` (``Complete``): only the start and
        the end, once the answer is whole. A call that ends without its answer is billed in
        the background (``Billing.bill_partial``), its bill added to ``unanswered``. ``window``: the
        request's deadline and its prefix-cache calls. ``model_sent``, ``model_refused``,
        ``late_bill``: as ``Pipeline.run``'s."""
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
            accepted=accepted_tiers(self._table, self._router, request),
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
            attempt.stalled_warm,
            attempt.start.engine_instance,
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
        retry = len(exclude) < MAX_REPLICA_RETRIES
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
                    outlasted = _answer_outlasted(
                        attempt,
                        end_chunk.output_tokens,
                        reported,
                        request.max_tokens,
                        end_chunk.visible_pieces,
                    )
                    raise _cut_unstarted(attempt, outlasted)
                if end_at >= attempt.opened_at + attempt.timeout_s - _DEADLINE_SLACK_S:
                    raise _answer_outlasted(
                        attempt,
                        end_chunk.output_tokens,
                        reported,
                        request.max_tokens,
                        end_chunk.visible_pieces,
                    )
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
            self._loads.progressed(attempt.replica, at)
        if part == "end":  # the model is done: its slot is free, whenever its caller reads it
            whole = not chunk.end.interrupted
            self._released(attempt, at, chunk.end.output_tokens if whole else None)

    def _released(self, attempt: Attempt, at: float, output_tokens: int | None) -> None:
        """``attempt``'s call no longer holds its replica's slot (once): its end came at
        ``at`` (``output_tokens``: a whole answer's, a measure of its decode), or it ended
        without one."""
        if not attempt.released:
            attempt.released = True
            self._loads.ended(attempt.replica, attempt.ticket, at, output_tokens)

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


def _error_type(exc: BaseException | None) -> str:
    """A failed model call's ``error.type`` (a closed set: a label of the GenAI metrics)."""
    if isinstance(exc, ReplicaCut):
        return "replica_cut"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    if isinstance(exc, RequestError):
        return exc.code.name
    return "_OTHER"  # the conventions' value for an error of no known type
