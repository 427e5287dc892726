"""A model call's bill in the router: its FINAL (under the router's own ROUTER_PREFIX_TIMEOUT_S),
the outbox that keeps what prefix-cache does not take, the journal's open call, and the spans
and metrics that wait for the bill.

``Billing`` is built by the ``Pipeline`` with what it needs (the dependency calls, the outbox,
the row tokenizers, the clock, the metrics, the pipeline's background tasks and its L1
Stores); it holds no state of its own between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, prefix_cache_pb2, semantic_cache_pb2
from services.common.errors import Code, RequestError
from services.common.kv_blocks import own_reuse
from services.common.models import ModelSpec, ModelTable
from services.common.output_count import streamed_output_tokens
from services.common.prompt import last_user_text
from services.common.span_events import record_event
from services.common.tokens import Tokenizers
from services.router import spans
from services.router.answer import Answer
from services.router.calls import Calls, PrefixWindow
from services.router.dispatch import Attempt
from services.router.metrics import RouterMetrics
from services.router.open_calls import OpenCall
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import JournalError

log = logging.getLogger("cachemesh.router")


def _kv_cached(attempt: Attempt, usage: prefix_cache_pb2.ProviderUsage | None) -> int:
    """The call's KV reuse: its start's, or, when the start could not tell it (a provider
    adapter), a self-hosted engine's reported ``prompt_tokens_details.cached_tokens``."""
    engine = attempt.start.kv_cached_unreported and attempt.model.provider == "self_hosted"
    if engine and usage is not None and usage.WhichOneof("report") == "openai":
        return usage.openai.prompt_tokens_details.cached_tokens
    return attempt.start.kv_cached_tokens


def _own_kv(warm: pb.Usage, usage: prefix_cache_pb2.ProviderUsage | None) -> int:
    """The most of a self-hosted engine's reuse the WARM found this tenant's own traffic left
    (its read, in prefix-cache's tokens), in the engine's tokens: scaled by the engine's
    reported count of the prompt (``own_reuse``); without its report, counted as the WARM's."""
    prompt = warm.input_tokens + warm.cache_creation_input_tokens + warm.cache_read_input_tokens
    engine = prompt
    if usage is not None and usage.WhichOneof("report") == "openai":
        engine = usage.openai.prompt_tokens
    return own_reuse(warm.cache_read_input_tokens, prompt, engine)


CommitReply = prefix_cache_pb2.CommitResponse | None


class Charge(Protocol):
    """Told of a model call billed without its answer: its usage and cost in nano-dollars (0
    for a bill kept in the outbox: the outbox counted its estimate as it journalled it)."""

    def __call__(self, usage: pb.Usage, cost_nanos: int, /) -> None: ...


# told, before its end goes out, the bill to come of an answer that goes at the router's
# estimate because its FINAL (sent under the router's own ROUTER_PREFIX_TIMEOUT_S) had not
# answered by the time the caller's deadline let the answer wait: the answer's end as billed
# (prefix-cache's bill; the estimate, marked so, when the FINAL failed and the outbox kept it)
LateBill = Callable[[asyncio.Future[pb.CompleteResponse]], None]


@dataclass(frozen=True)
class Bill:
    """What a model call that ended without its answer (cancelled, or cut before a retry) was
    billed: prefix-cache's FINAL, or the estimate at base prices when it went to the outbox."""

    usage: pb.Usage
    cost: pb.Cost


# a request's bills of such calls, each known once its FINAL is (None: it could not be kept)
Bills = list[asyncio.Future[Bill | None]]


@dataclass(frozen=True)
class BillInputs:
    """The inputs of a model call's bill, fixed where the bill starts (``Billing.finish``,
    ``Billing.bill_partial``) and passed through its steps (the FINAL, the outbox, the late
    bill): whose request and which call, the output tokens billed, the baseline row's id, the
    provider's report (None: none) and the call's open call in the journal (None: none)."""

    tenant: str
    request: pb.CompleteRequest
    attempt: Attempt
    output_tokens: int
    baseline_id: str
    usage: prefix_cache_pb2.ProviderUsage | None
    open_call: OpenCall | None = None


_NO_STORE = (pb.SEMANTIC_MODE_BYPASS, pb.SEMANTIC_MODE_NO_STORE)
_T = TypeVar("_T")


class InBackground(Protocol):
    """Runs a call past the request's end (the ``Pipeline``'s background tasks, which its
    ``drain`` awaits at shutdown)."""

    def __call__(self, call: Awaitable[_T], /) -> asyncio.Future[_T]: ...


class Billing:
    def __init__(
        self,
        calls: Calls,
        outbox: BillingOutbox | None,
        tokenizers: Tokenizers,
        tracer: trace.Tracer,
        clock: Callable[[], float],
        metrics: RouterMetrics | None,
        in_background: InBackground,
        stores: weakref.WeakSet[asyncio.Future[Any]],
    ) -> None:
        """``calls``: the router's calls to its dependencies (the FINAL, the WARM, the Store).
        ``outbox`` keeps the commits prefix-cache did not take (None: such answers stay
        estimated and unbilled, as in the offline estimator). ``tokenizers``: each row's, for
        the router's count of a call's output. ``clock``: the pipeline's. ``metrics``: the
        service's (None: the offline estimator). ``in_background``: runs a bill past its
        request (the pipeline's ``drain`` awaits it); ``stores``: the L1 Stores among those
        (the pipeline's ``end_stores`` ends them)."""
        self._calls = calls
        self._outbox = outbox
        self._tokenizers = tokenizers
        self._tracer = tracer
        self._clock = clock
        self._metrics = metrics
        self._in_background = in_background
        self._stores = stores

    async def finish(
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
        ``late_bill``: as ``Pipeline.run``'s."""
        usage = end_chunk.provider_usage if end_chunk.HasField("provider_usage") else None
        if usage is not None and not usage.WhichOneof("report"):
            usage = None
        # with a provider's report, its count (prefix-cache refuses a FINAL that differs);
        # the model service's end carries that count
        output_tokens = end_chunk.output_tokens if usage is None else _reported_output(usage)
        inputs = BillInputs(tenant, request, attempt, output_tokens, baseline.id, usage, open_call)
        final, sent = await self._bill_answer(inputs, window, warm_call)
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
                # WARM found this tenant's own traffic left there (none without a WARM), in
                # the engine's tokens
                own = _own_kv(warm.usage, usage) if warm is not None else 0
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
            bill = self._late_bill(inputs, sent, estimate)
            late = self._in_background(bill)
            attempt.late = late
            if late_bill is not None:
                late_bill(late)
        return end

    async def _bill_answer(
        self,
        inputs: BillInputs,
        window: PrefixWindow,
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
        at once, as before; so does one without ``warm_call``, and one whose WARM prefix-cache
        did not take (``_unwarmed``: prefix-cache would refuse it) without being sent."""
        if warm_call is not None and _unwarmed(warm_call, window):
            await self._keep(inputs)
            return None, None
        if warm_call is None or self._calls.prefix_faulted(window):
            return await self._commit_final(inputs, window), None
        # the answer's wait, as it was: the FINAL's share of the caller's deadline; when that
        # is the router's own limit, the FINAL's own timeout bounds it (no race with it)
        # (asked without the breaker: its half-open trial is the FINAL's own)
        share_s = 0.0 if window.off else self._calls.prefix_share_s(window)
        waits_s = share_s if share_s < self._calls.prefix_share_s() else None

        async def send() -> prefix_cache_pb2.CommitResponse | None:
            own = await self._billing_window(inputs, warm_call, window)
            if own is None:  # its WARM, sent again, was not taken either: the outbox's
                return None
            try:
                return await self._send_final(inputs, own)
            finally:  # a timeout of its own ends the request's calls, as one of the window's
                if own.off:
                    window.turned_off(own.clients)
                window.counted |= own.counted

        sent = self._in_background(send())
        try:
            if waits_s is None or waits_s > 0:
                await asyncio.wait((sent,), timeout=waits_s)
            if not sent.done() and inputs.open_call is not None:
                # the answer's bill, whole, journalled and fsynced before the answer goes (as
                # the outbox would have kept it): a router killed, or its host crashed, before
                # the FINAL's reply bills it whole at its next start
                line = _final(inputs)
                await self._written_in_time(inputs.open_call.answered(line), window)
        except asyncio.CancelledError:
            sent.cancel()  # its caller left: the call's bill without its answer sends it
            raise
        if not sent.done():
            return None, sent
        final = sent.result()
        if final is not None:
            if inputs.open_call is not None:
                inputs.open_call.settled(final_made=True)
            return final, None
        await self._keep(inputs)
        return None, None

    async def _written_in_time(self, written: asyncio.Future[None], window: PrefixWindow) -> None:
        """Waits for an answer's journal line to be fsynced (``written``), no longer than the
        request's deadline leaves: a slow or hung disk made the answer, whole and paid for,
        miss its caller's deadline (an fsync of 0.5 s: the caller had no end). Past it the
        answer goes, and the late sync is told: its line is in the file, or still queued behind
        another line's write or fsync on the journal's one thread; a router killed before it is
        written bills the open call's count (an answer of 3 tokens billed 0 in a scratch run),
        a host crash before its fsync loses it. A failed write is logged by the journal."""
        written.add_done_callback(_retrieved)
        if written.done():  # (no journal: nothing to wait for, not even a turn of the loop)
            return
        left_s = None if window.deadline is None else max(window.deadline - self._clock(), 0.0)
        await asyncio.wait((written,), timeout=left_s)
        if not written.done():
            log.warning(
                "an answer went before its bill's journal line was synced to disk (the disk "
                "or the journal's thread is slow: %.3f s of the request's deadline were left); "
                "a router killed or a host crash now would bill it short or lose it",
                left_s or 0.0,
            )

    async def _late_bill(
        self,
        inputs: BillInputs,
        sent: asyncio.Future[prefix_cache_pb2.CommitResponse | None],
        estimate: pb.CompleteResponse,
    ) -> pb.CompleteResponse:
        """The end of an answer that went at the router's ``estimate`` as billed, once its
        FINAL (``sent``) is answered: prefix-cache's bill; or, when prefix-cache failed it,
        ``estimate`` with its bill kept in the outbox (counted at that estimate as its line
        is written, corrected by the replay, as any bill prefix-cache does not take). Until
        the answer's FINAL is made or kept its open call stays journalled (a router killed
        meanwhile has it billed at its next start)."""
        attempt, open_call = inputs.attempt, inputs.open_call
        key = attempt.commit_key(inputs.request.request_id)
        try:
            final = await sent
        except Exception as exc:  # a fault past prefix-cache's failures, which give None
            log.error("the FINAL of %s failed: %s", key, exc)
            final = None
        if final is not None:
            if open_call is not None:
                open_call.settled(final_made=True)
            billed = pb.CompleteResponse()
            billed.CopyFrom(estimate)
            _with_bill(billed, final, attempt.model)
            return billed
        try:
            await self._keep(inputs)
        except RequestError:  # neither sent nor kept, its answer gone: never silent
            log.error(
                "billing outbox: the bill of %s (tenant %s, estimated cost_nanos=%d), an answer "
                "served at its estimate, could be neither sent nor kept: lost",
                key,
                inputs.tenant,
                estimate.cost.cost_nanos,
            )
            if self._metrics is not None:
                self._metrics.outbox_dropped(1)
        return estimate

    def bill_partial(
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
        # each non-empty piece at least a token (``streamed_output_tokens``): a whitespace
        # runaway's 1,281 pieces were billed our count of its text, 325
        output_tokens = streamed_output_tokens(
            sum(tokenizer.count(text) for text in (answer.text(), answer.tool_text()) if text),
            answer.pieces,
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
            counted = answer.progress_tokens + streamed_output_tokens(
                tokenizer.count(since) if since else 0, answer.pieces_since_progress
            )
            output_tokens = max(output_tokens, counted)
        inputs = BillInputs(
            tenant, request, attempt, output_tokens, baseline.id, reported, open_call
        )

        async def bill() -> Bill | None:
            final: prefix_cache_pb2.CommitResponse | None = None
            try:
                if attempt.kept_output_tokens is None:  # else the journal holds its bill
                    own = await self._billing_window(inputs, warm_call, window)
                    final = await self._commit_final(inputs, own)
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
        self, inputs: BillInputs, warm_call: asyncio.Future[CommitReply], window: PrefixWindow
    ) -> PrefixWindow | None:
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
        at 9.4x its bill). None: the call's WARM was not taken (``_unwarmed``), or, sent again,
        was not taken this time either (failed, not timed out): its FINAL is not sent (it would
        only be refused), it goes to the outbox behind that WARM (``_keep``)."""
        if _unwarmed(warm_call, window):
            return None
        if not (window.off and window.clients):
            return PrefixWindow(off=window.off, clients=window.clients)
        own = PrefixWindow()
        if _taken(warm_call) is None:
            warm = _replay_warm(inputs.tenant, inputs.request, inputs.attempt)
            if await self._calls.commit_warm(warm, inputs.request, own) is None and not own.off:
                return None
        return own

    def trace_bill(
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
            self.count_model_call(
                attempt, known.usage if known is not None else None, seconds, error_type
            )

        bill.add_done_callback(billed)

    def trace_late_bill(
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
            self.count_model_call(attempt, known.usage if known is not None else None, seconds, "")

        late.add_done_callback(billed)

    def count_model_call(
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
        self, inputs: BillInputs, window: PrefixWindow | None
    ) -> prefix_cache_pb2.CommitResponse | None:
        """FINAL; when prefix-cache does not acknowledge it (or it is not sent: ``window``
        off, or None: its WARM was not taken), the outbox keeps the commits (durably, before
        the answer is sent) and bills them once prefix-cache is back. Either settles the
        call's ``open_call`` (cancelled before: it is left to the next FINAL, or to the next
        start of the router)."""
        final = None
        if window is not None:
            final = await self._send_final(inputs, window)
        if final is not None and inputs.open_call is not None:
            inputs.open_call.settled(final_made=True)
        if final is None:
            await self._keep(inputs)
        return final

    async def _send_final(
        self, inputs: BillInputs, window: PrefixWindow
    ) -> prefix_cache_pb2.CommitResponse | None:
        """The answer's FINAL, sent under ``window`` (None: not acknowledged, or not sent)."""
        attempt, request = inputs.attempt, inputs.request
        return await self._calls.commit_final(
            inputs.tenant,
            request,
            attempt.commit_key(request.request_id),
            attempt.model.id,
            attempt.replica,
            inputs.output_tokens,
            _kv_cached(attempt, inputs.usage),
            inputs.baseline_id,
            inputs.usage,
            window,
        )

    async def _keep(self, inputs: BillInputs) -> None:
        """The commits of a FINAL prefix-cache did not acknowledge (or that was not sent), kept
        in the outbox (durably) at the router's estimate, which its replay bills; without an
        outbox, nothing. ``RequestError`` when it cannot be kept at all."""
        attempt, open_call = inputs.attempt, inputs.open_call
        key = attempt.commit_key(inputs.request.request_id)
        if self._outbox is not None:
            # the WARM again, with the request: a no-op if the first one was recorded; else it
            # records the prompt with the read the call's Plan predicted on arrival and the
            # arrival's time (the provider looked its cache up then): a prefix that was warm is
            # billed as the read it was, never as a write (1.25x / 2x where the read is 0.1x),
            # however long the outage (the prefix expired since) and across a prefix-cache
            # restart (its warm state lost), and its lifetime runs from the arrival. The
            # answer's estimate claimed no discount, so a read bills at most that estimate.
            replay_warm = _replay_warm(inputs.tenant, inputs.request, attempt)
            replay_final = _final(inputs)
            opened = open_call.entry if open_call is not None else None
            written = False  # its line in the journal, in place of the open call's
            try:
                estimate = attempt.model.baseline_nanos(
                    attempt.start.prompt_tokens, inputs.output_tokens
                )
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
                attempt.kept_output_tokens = inputs.output_tokens
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
                # leaves it to the replay only when that fails too (``bill_partial``)
                if open_call is not None and written:
                    open_call.settled(final_made=False)
            record_event(self._tracer, "cachemesh.billing_deferred", {"commit": key})

    def journal_open(
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
        # the FINAL as it stands before any output: none counted, no provider report
        opened = BillInputs(tenant, request, attempt, 0, baseline.id, None)
        return open_call.open(journalled, _final(opened))

    async def warm_once_written(
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


async def _after(first: asyncio.Future[CommitReply], then: Callable[[], Awaitable[_T]]) -> _T:
    """``then()`` once ``first`` has ended, whatever its outcome: a WARM prefix-cache could
    not take is degraded already, and the FINAL's outbox replays the WARM then. Shielded, so
    cancelling this (a forced shutdown) does not cancel the WARM too."""
    try:
        await asyncio.shield(first)
    except Exception:
        log.exception("the WARM commit of a call that ended early failed; billing its FINAL")
    return await then()


def _taken(warm_call: asyncio.Future[CommitReply]) -> CommitReply:
    """The WARM's reply (None: not taken, or not done)."""
    if warm_call.done() and not warm_call.cancelled() and warm_call.exception() is None:
        return warm_call.result()
    return None


def _unwarmed(warm_call: asyncio.Future[CommitReply], window: PrefixWindow) -> bool:
    """Whether the call's WARM ended without prefix-cache taking it (it failed: down, its Redis
    down, an internal fault; counted and logged as degrading, and the open call carries it as
    a replay sends it) while the request's prefix-cache calls are still on: its FINAL would
    then be sent, and only refused (FAILED_PRECONDITION, "no WARM commit": a doomed call that
    a review's Redis outage counted as a second degradation of prefix-cache, with a WARNING,
    for each such request). It goes to the outbox instead, behind the WARM, which the replay
    sends first. (A WARM that timed out, or was not made, turned the calls off: the FINAL is
    not made, as before; one its client's deadline cut is sent again by the bill's own
    window, ``Billing._billing_window``.)"""
    return warm_call.done() and not window.off and _taken(warm_call) is None


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


def _final(inputs: BillInputs) -> prefix_cache_pb2.CommitRequest:
    """The call's FINAL as a replay sends it."""
    attempt = inputs.attempt
    final = prefix_cache_pb2.CommitRequest(
        tenant=inputs.tenant,
        request_id=attempt.commit_key(inputs.request.request_id),
        phase=prefix_cache_pb2.COMMIT_PHASE_FINAL,
        model=attempt.model.id,
        replica=attempt.replica,
        output_tokens=inputs.output_tokens,
        kv_cached_tokens=_kv_cached(attempt, inputs.usage),
        baseline_model=inputs.baseline_id,
    )
    if inputs.usage is not None:
        final.provider_usage.CopyFrom(inputs.usage)
    return final


def _reported_output(usage: prefix_cache_pb2.ProviderUsage) -> int:
    """A provider report's output tokens, as prefix-cache reads them (``reported_usage``)."""
    if usage.WhichOneof("report") == "anthropic":
        return usage.anthropic.output_tokens
    return usage.openai.completion_tokens


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
