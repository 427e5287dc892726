"""Which model and replica serve a miss, and the model call up to its first token.

The tier comes from the learned router (``routing``; or the requested model); the replica from
the configured replica policy (``replica_choice``: predicted time to first token by default) over
prefix-cache's view of the replicas and the router's own record of their queues and measured
rates (``replica_state``); a replica that fails before its first token hands the request to the
next one, and for ``auto`` to the other tiers (nearest in price first), as does a simulated or
self-hosted one that stalls (no first report long past its predicted prefill, and no token on
its other calls meanwhile: a replica streaming answers is busy, not hung). A call on such a
replica that goes silent mid-answer (``SilenceWatch``: no chunk for ``silent_after_s``, and no
sign of life on the replica's other calls) is cut, as a replica that dies there is, while
another replica could take the request over. A replica whose calls keep failing is left out
for a cool-off (``replica_health``), unless all are.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import Clock, SecondsClock, SystemClock, Throttles, suppressed
from services.common.errors import Code, RequestError
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.tokens import Tokenizer, Tokenizers
from services.router import spans
from services.router.balance import Route
from services.router.calls import CLIENT_FAULTS, Calls, PrefixWindow
from services.router.dependencies import CallFailed, Dependencies, ModelStream
from services.router.own_pause import paused_s
from services.router.prompt_counts import count_prompt
from services.router.replica_choice import ChoiceSettings, ReplicaChooser, Request
from services.router.replica_health import ReplicaHealth
from services.router.replica_state import (
    ReplicaStates,
    lost_prefix_explains_stall,
    stalled_after_s,
    warm_enough_to_stall_cold,
)
from services.router.routing.router import Routed

log = logging.getLogger("cachemesh.router")
_HASH_BYTES = 32  # one KV block hash in PromptFacts.kv_block_hashes
# The replicas whose call, abandoned before its first report, is billed to no one: the
# simulator and a self-hosted engine bill nothing of their own, and the router bills a call
# only from its start (the WARM commit). Such a call that has stalled is handed over to the
# next replica. Not a provider's: its start comes with its first token, after a prefill it
# may bill even for a call cancelled then (the operator would pay for the prompt twice), and
# its time to first token is its own queue's, not the router's prediction.
_UNBILLED_BEFORE_START = ("simulated", "self_hosted")
# The replicas whose engine prefills a prompt to its end after its call was left before the
# first token (llama-server runs a batch to its end): their queue keeps that prefill.
_PREFILLS_WHEN_LEFT = ("self_hosted",)
# The replicas whose call silent mid-answer is cut (``SilenceWatch``): the router's own
# engines, whose pace it sees. A provider's stream pauses for its own reasons (a server tool
# running, thinking it does not stream), and its deadline bounds it.
_WATCHED_MID_ANSWER = ("simulated", "self_hosted")
# A call streaming its answer is silent once it has sent no chunk for SILENT_FACTOR times its
# mean time between chunks, at least the floor (ROUTER_MID_ANSWER_STALL_S), plus the prefill
# queued at its replica (``silent_after_s``). Measured on a loaded 2-core machine: the
# simulator's chunks come every 19 ms, the longest gap 42 ms in 2,821 (sim-large, 4 tokens a
# chunk at SIM_TIME_SCALE 0.3, 8 callers); llama-server (SmolLM2-135M, one thread, one slot)
# a token every 15 ms, its longest gap 40 ms in 400 with three 2,000-token prompts queued
# behind it. Gaps far longer than the pace come from another prompt's prefill run between two
# tokens: with --parallel 2 and batches of 256 tokens, up to 4.8 s; with --parallel 4 and the
# default batch of 2,048, 33 s (the queued prefill term covers those the router sent). The
# factor is for a slow engine's own pace (a token a second: 50 s). A tool call's arguments,
# which an adapter sends whole, and a reasoning model's thinking, which it does not pass on,
# count as they are written (its ``progress`` chunks).
SILENT_FACTOR = 50.0
# how many times within the silence allowed a waiting read looks at its replica's other calls:
# a sign of life there starts the silence again from that look (at most a tenth late)
_SILENCE_LOOKS = 10
_T = TypeVar("_T")
# a replica's failed calls logged at most one line this often for each status code (the first
# at once): every request to a model whose replicas are down tried each, a line each
REPLICA_FAILED_LOG_EVERY_MS = 10_000


@dataclass
class Attempt:
    """A model call whose prefill is done: its replica, stream and first report."""

    model: ModelSpec
    tier_reason: str
    replica: str
    stream: ModelStream
    start: model_pb2.GenerateStart
    chat_span: trace.Span
    route: Route
    planned_read: int | None  # the cache read Plan predicted on arrival (None: no Plan)
    plan_id: str  # names the prompt Plan computed, for the WARM commit ("" = none)
    opened_at: float  # when its Generate was called (the clock of the Dispatcher)
    timeout_s: float  # the call's deadline, from ``opened_at`` (``Calls.model_timeout_s``)
    probe: bool = False  # the replica's probe after its cool-off, until the call's verdict
    ticket: int = 0  # the call's in the replicas' record (``ReplicaStates.ended``)
    # when the Plan looked the cache up, on prefix-cache's clock (without a Plan: when the
    # router made the call, on its clock of the time of day; None: an older prefix-cache's Plan
    # that does not say): a replayed WARM, and one without a Plan, is settled as of then
    planned_at_ms: int | None = None
    # Each model call is billed under its own id: a retry after a cancelled or failed call is
    # a new provider call, while retries of the same Commit stay idempotent.
    attempt_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # the output tokens of its bill the outbox's journal holds though the write was not known
    # durable (its answer refused): billed at the next replay, so billed nowhere else
    kept_output_tokens: int | None = None
    # for auto, when the call is watched and its model has no replica left: whether another
    # tier could take the request over were this call cut mid-answer (accepted by its
    # threshold, a replica not cut on it, a context window that holds it); asked only at a
    # silence (``SilenceWatch``), as it may count the prompt (None: none could)
    takers: Callable[[], Awaitable[bool]] | None = None
    # its start came at its deadline with no token, only so that the prompt its provider
    # reported is billed (``GenerateStart.cut_before_first_token``): no first report, the
    # replica judged already as for a deadline before a start, no sign of life in its chunks
    cut_before_first_token: bool = False
    # ``timeout_s`` is the router's ROUTER_MODEL_TIMEOUT_S, sooner than what the caller's
    # deadline left (or the caller set none): a cut at it is the server's fault, not the caller's
    routers_deadline: bool = False
    released: bool = False  # its end came: its replica's slot is free (``ReplicaStates.ended``)
    # its answer went at the router's estimate, its bill to come (``billing.LateBill``): its
    # span and GenAI metrics wait for that bill
    late: asyncio.Future[pb.CompleteResponse] | None = None
    # the replicas of its model this request's call stalled on before it came here, while its
    # Plan predicted them warm: its WARM tells prefix-cache (``stalled_warm_replicas``), as the
    # stalled calls send no commit whose engine report would correct the view
    stalled_warm: tuple[str, ...] = ()

    def commit_key(self, request_id: str) -> str:
        return f"{request_id}#{self.attempt_id}"


def silent_after_s(pace_s: float, floor_s: float, queued_prefill_s: float) -> float:
    """How long a call streaming its answer may send nothing before it is silent: its mean
    time between chunks (``pace_s``) times SILENT_FACTOR, at least ``floor_s``, plus the
    prefill of the calls waiting for their first report at its replica (an engine batching
    a prompt's prefill with the decodes holds them meanwhile: llama-server with --parallel)."""
    return max(SILENT_FACTOR * pace_s, floor_s) + queued_prefill_s


def expects_fair_queue(spec: ModelSpec) -> bool:
    """Whether a replica of ``spec``'s row is expected to serve its waiting calls' turns by
    tenant, until it says (``GenerateStart.tenant_fair_queue``): the simulator's prefill queue
    does; a self-hosted row with ``replica_slots`` has, by default, a model service gate of as
    many calls (``MODEL_MAX_CONCURRENT_CALLS``) with its fair queue; any other (a hosted
    provider, a batching engine such as vLLM or SGLang) has none unless that is set, and its
    engine serves first come first served."""
    return spec.provider == "simulated" or spec.replica_slots is not None


def fallback_tiers(tiers: tuple[str, ...], chosen: str) -> list[str]:
    """The other tiers, nearest in price first; of two as near, the dearer (no loss of
    quality) first."""
    at = tiers.index(chosen)
    others = [i for i in range(len(tiers)) if i != at]
    return [tiers[i] for i in sorted(others, key=lambda i: (abs(i - at), -i))]


def _client_wait(waits: list[tuple[int, bool] | None]) -> tuple[int | None, bool]:
    """The wait told to a client whose every replica tried refused saying one (``waits``: each
    one's whole seconds and whether its provider asked for it, else the replica's own backoff
    after its retries), and whether it is a provider's: None when one said none.

    Among each kind the least (the first replica free again, by the provider's word or by the
    backoff), then, when a provider asked a wait and a replica backed off, the larger of the
    two: a retry sooner than the provider asked is refused by it (and counts against the
    account's rate limit), one sooner than a replica's backoff calls again a provider that was
    just tried three times; the larger is the first time neither applies, and costs a caller
    at most ``PROVIDER_BACKOFF_MAX_S`` more than the provider's wait. So the message says "as
    the provider asked" only when the figure is the provider's."""
    said = [wait for wait in waits if wait is not None]
    if not said or len(said) != len(waits):
        return None, False
    asked = [seconds for seconds, by_provider in said if by_provider]
    backoffs = [seconds for seconds, by_provider in said if not by_provider]
    if not asked:
        return min(backoffs), False
    if backoffs and min(backoffs) > min(asked):
        return min(backoffs), False
    return min(asked), True


class Dispatcher:
    def __init__(
        self,
        calls: Calls,
        dependencies: Dependencies,
        table: ModelTable,
        tracer: trace.Tracer,
        choice: ChoiceSettings,
        clock: Callable[[], float],
        tokenizer: Tokenizers | Tokenizer,
        ejected: Callable[[str], None] | None = None,
        hand_over_stalls: bool = True,
        silent_floor_s: float = 0.0,
        wall: Clock | None = None,
    ) -> None:
        """``tokenizer``: each row's (or one for all), counts the prompt for ``auto``'s
        context-window check when prefix-cache made no Plan (it is down); ``ejected``: the
        ejections' metric, by model (None: a router built without metrics);
        ``hand_over_stalls``: a stalled call's hand-over, and the cut of a call silent
        mid-answer (their timers run in real time: off for a replay on a virtual clock);
        ``silent_floor_s``: the least silence mid-answer that is cut (0: none is);
        ``wall``: prefix-cache's clock, the arrival of a call made without a Plan (None: the
        system's)."""
        self._ejected = ejected
        self._hand_over_stalls = hand_over_stalls
        self._silent_floor_s = silent_floor_s
        self._prior_tps = choice.ttft.prior_prefill_tps
        self._calls = calls
        self._tokenizers = Tokenizers.of(tokenizer)
        self._deps = dependencies
        self._table = table
        self._tracer = tracer
        self._clock = clock
        self._failed_log = Throttles(SecondsClock(clock), REPLICA_FAILED_LOG_EVERY_MS)
        self._wall = wall if wall is not None else SystemClock()
        # the pipeline releases a call when its answer ends
        self.loads = ReplicaStates(choice.ttft.kv_capacity_tokens)
        self._chooser = ReplicaChooser(choice, self.loads)
        self._ejection = choice.ejection
        self._health: dict[str, ReplicaHealth] = {}

    def health(self, model: str) -> ReplicaHealth:
        """The ejection state of ``model``'s replicas. Kept per model: one address may serve
        several models (a provider's, or one engine's), and one model's failures there (its
        provider overloaded) must neither eject the others nor be cleared by their answers."""
        health = self._health.get(model)
        if health is None:
            health = self._health[model] = ReplicaHealth(self._ejection)
        return health

    async def open(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        routed: Routed | None = None,
        exclude: frozenset[str] = frozenset(),
        deadline: float | None = None,
        window: PrefixWindow | None = None,
        accepted: Sequence[str] = (),
        sent: Callable[[], None] | None = None,
        declined: Callable[[], None] | None = None,
    ) -> Attempt:
        """Starts the model call on the first replica that answers (prefill done); an
        ``auto`` request goes to ``routed``'s tier first, reusing the Plans it made; replicas
        in ``exclude`` (cut mid-answer on this request) are not tried. ``deadline`` (on this
        dispatcher's clock): when the model must have answered by, for the client's deadline;
        it bounds each call (its replica's retries with it), and once it has passed no other
        replica is tried (DEADLINE_EXCEEDED). ``window``: the request's prefix-cache calls (None:
        this call's own, within ``deadline``). ``accepted``: the tiers an ``auto`` request
        accepts an answer of (empty: any; ``routing.threshold`` -1: the large tier alone, as
        L1's lookup), the only ones it falls back to. ``sent``: told just before each
        Generate is sent to a replica (not for the Plans before it, nor for a request refused
        before any replica is called). ``declined``: told when a Generate told ``sent`` ended
        with its replica's refusal before its start (a status of its own, not a deadline or a
        stall hand-over: the replica may have been prefilling then), so it produced nothing
        and is billed nothing."""
        if window is None:
            window = PrefixWindow(deadline)
        # the Plans at hand, by model id: routed's, and those made here (None: prefix-cache down)
        plans = dict(routed.plans) if routed is not None else {}
        refused: list[str] = []  # the cheaper tiers the request's threshold refuses
        if request.model == AUTO:
            assert routed is not None
            choice = routed.decision
            first = self._table.for_tier(choice.tier)
            others = fallback_tiers(self._table.tiers, choice.tier)
            refused = [tier for tier in others if accepted and tier not in accepted]
            options = [(first, choice.reason)] + [
                (self._table.for_tier(tier), f"fallback: {first.id} unavailable")
                for tier in others
                if tier not in refused
            ]
            options = self._usable_first(options, exclude)
        else:
            spec = self._table.get(request.model)
            assert spec is not None
            options = [(spec, "requested")]
        failures: list[str] = []
        # each failure's wait (None: none said) and whether its provider asked for it (a 429's
        # retry-after that outlasted the call's deadline, or that a replica spent its retries
        # on) or it is the replica's own backoff after its retries: the client's retry-after
        # when every failure said one
        waits: list[tuple[int, bool] | None] = []
        # each failure's mark: its replica had spent its retries of its provider already
        retried: list[bool] = []
        # auto's tiers whose context window cannot hold the prompt and max_tokens of answer
        too_long: list[str] = []
        room = False  # one of them holds the prompt, not max_tokens of answer with it
        # the router's own counts of the prompt (no Plan), by vocabulary
        counted: dict[str, int] = {}
        # an ``auto`` tier's replica refused the request as too large for it (its context
        # window by the provider's own count, its account's per-minute tokens): the tiers
        # after it are tried, and this refusal is the request's if none answers and no tier
        # failed for now, before it or after it (else the request's failure is theirs,
        # transient, with its wait: a retry may be answered); its own is among ``failures``
        too_large: tuple[str, RequestError] | None = None

        async def takes_over(spec: ModelSpec, plan_it: bool) -> bool:
            """Whether ``spec``'s tier could take this ``auto`` request over: a replica not
            in ``exclude``, and a context window that holds the prompt and max_tokens of
            answer, counted as the loop below does (a tier too small is skipped there: a
            replica left for it is no replica left). Without its Plan at hand, ``plan_it``:
            made now (and kept for the loop); else the router's own count (the same
            canonical prompt and vocabulary, no prefix-cache call)."""
            if not set(self._deps.replicas(spec.id)) - exclude:
                return False
            if spec.id not in plans and plan_it:
                replicas = self._deps.replicas(spec.id)
                plans[spec.id] = await self._calls.plan(tenant, spec.id, request, replicas, window)
            tokens = await self._window_tokens(request, spec, plans.get(spec.id), counted)
            return tokens + request.max_tokens <= spec.context_window_tokens

        async def later_takes_over(at: int) -> bool:
            """Whether a tier after the ``at``-th option could take the request over (its
            Plans made now: asked at a stall, as the loop would next)."""
            for spec, _ in options[at + 1 :]:
                if await takes_over(spec, plan_it=True):
                    return True
            return False

        async def other_takes_over(tier: str) -> bool:
            """Whether a tier other than ``tier`` could take the request over were its call
            cut mid-answer (the Plans at hand, else the router's own count: asked at a
            silence, not before the first token)."""
            for other, _ in options:
                if other.id != tier and await takes_over(other, plan_it=False):
                    return True
            return False

        for at, (spec, reason) in enumerate(options):
            replicas = self._deps.replicas(spec.id)
            if not set(replicas) - exclude:
                continue
            if spec.id not in plans:
                plans[spec.id] = await self._calls.plan(tenant, spec.id, request, replicas, window)
            plan = plans[spec.id]
            facts = plan.prompt if plan is not None and plan.HasField("prompt") else None
            prompt_tokens = plan.prompt_tokens if plan is not None else 0
            window_tokens = prompt_tokens
            if request.model == AUTO:
                window_tokens = await self._window_tokens(request, spec, plan, counted)
            needed = window_tokens + request.max_tokens
            if request.model == AUTO and needed > spec.context_window_tokens:
                # the replica would refuse it (vLLM and OpenAI refuse a prompt whose
                # max_tokens do not fit the window: a 400, the request's fault, which ends
                # it): a tier that can hold both answers instead
                answer = ""
                if window_tokens <= spec.context_window_tokens:
                    answer = f" plus max_tokens {request.max_tokens}"
                    room = True
                too_long.append(
                    f"{spec.id}: the prompt's {window_tokens} tokens{answer} are over its "
                    f"context window of {spec.context_window_tokens}"
                )
                continue
            if too_long and reason.startswith("fallback"):
                reason = (
                    f"fallback: the prompt and max_tokens are over the context window of {first.id}"
                )
            if too_large is not None and reason.startswith("fallback"):
                reason = f"fallback: {too_large[0]} refused the request as too large for it"
            view = {c.replica: c.warm_prefix_tokens for c in plan.candidates} if plan else {}
            raw = facts.kv_block_hashes if facts is not None else b""
            hashes = [raw[i : i + _HASH_BYTES] for i in range(0, len(raw), _HASH_BYTES)]
            wanted = Request(spec.id, prompt_tokens, hashes, spec.prior_prefill_rate, tenant)
            # the ejected replicas only when all are (then the choice is among them), else
            # after the others, as a last resort
            now = self._clock()
            health = self.health(spec.id)
            usable, ejected = health.split([r for r in replicas if r not in exclude], now)
            route = self._chooser.choose(wanted, usable or ejected, view, now)
            if usable and ejected:
                route = replace(route, ejected=tuple(ejected))
            candidates = (*route.order, *(ejected if usable else ()))
            # the replicas of this model whose call stalled where the Plan predicted them warm
            stalled_warm: list[str] = []
            for n, replica in enumerate(candidates, 1):
                remaining_s = self._remaining_s(deadline)
                if remaining_s is not None and remaining_s <= 0:
                    raise _deadline_passed(spec.id, failures)
                timeout_s = self._calls.model_timeout_s(remaining_s)
                chat_span = spans.start_chat_span(self._tracer, spec.id, replica, spec.provider)
                match = route.match_tokens if replica == route.order[0] else view.get(replica, 0)
                opened_at = self._clock()
                arrived_ms = self._wall.now_ms()  # when the provider looks its cache up
                needs_s = self._chooser.predicted_ttft_s(wanted, replica, match, opened_at)
                # the same with nothing warm there: whether a lost prefix explains a stall
                # (made now, as the queue is when the call is sent; only when enough of the
                # prompt is predicted warm for a lost prefix to explain one: never read else)
                cold_s = (
                    self._chooser.predicted_ttft_s(wanted, replica, 0, opened_at)
                    if warm_enough_to_stall_cold(match, prompt_tokens)
                    else needs_s
                )
                handover_s = self._handover_s(spec, wanted, replica, needs_s, timeout_s)
                # a tier's last replica is the request's last unless a later tier could take
                # the request over: one with a replica left, asked at the stall whether its
                # context window holds the prompt (the stall hand-over applies before that);
                # an earlier one's is handed over unless each replica after it is as slow (a
                # loaded machine, a prior too fast: it would wait as long there): watched again
                hand_over: Callable[[], Awaitable[bool]] | None
                if n == len(candidates):
                    later = [o for o, _ in options[at + 1 :]]
                    if not any(set(self._deps.replicas(o.id)) - exclude for o in later):
                        handover_s = None
                    hand_over = functools.partial(later_takes_over, at)
                else:
                    hand_over = functools.partial(
                        self._one_not_overdue, wanted, candidates[n:], replica, opened_at, needs_s
                    )
                probe = health.sending(replica, opened_at)
                # why this replica, on its span whatever the call's end (a stall, a refusal)
                sent_route = replace(
                    route
                    if replica == route.order[0]
                    else Route(route.order, match, "fallback", 0, ejected=route.ejected),
                    probe=probe,
                )
                spans.route_decision(chat_span, sent_route)
                ticket = self.loads.sent(
                    replica,
                    prompt_tokens,
                    prompt_tokens - match,
                    hashes,
                    opened_at,
                    request.max_tokens,
                    spec.replica_slots,
                    tenant=tenant,
                    fair_queue=expects_fair_queue(spec),
                )
                if sent is not None:
                    sent()  # from here the replica may prefill, and its provider bill
                try:
                    # current for the call, its status set below: use_span's default would
                    # make a refusal of the request (a 400 of the provider) an ERROR
                    with trace.use_span(
                        chat_span,
                        end_on_exit=False,
                        record_exception=False,
                        set_status_on_exception=False,
                    ):
                        stream, start = await _stalled_after(
                            self._calls.generate(
                                tenant, spec.id, request, replica, facts, timeout_s
                            ),
                            handover_s,
                            needs_s,
                            functools.partial(self.loads.progress, replica),
                            hand_over,
                            watch_again=n < len(candidates),
                        )
                except RequestError as exc:
                    if declined is not None:
                        declined()  # its refusal, or an end with no start: nothing produced
                    self.loads.failed(replica, ticket)
                    if exc.code in CLIENT_FAULTS:
                        health.released(replica, probe)  # its refusal is the request's
                        spans.chat_refused(chat_span, exc)  # error.type, no ERROR
                    else:  # the replica's fault (it sent no start): its span says so
                        self.replica_failed(spec.id, replica, probe)
                        chat_span.record_exception(exc)
                        spans.record_failure(chat_span, exc)
                    chat_span.end()
                    if request.model == AUTO and exc.code == Code.RESOURCE_EXHAUSTED:
                        if too_large is None:
                            failures.append(f"{spec.id}: {exc.code.name} ({exc})")
                            too_large = (spec.id, exc)
                        break  # another tier, another window and account, may take it
                    raise
                except CallFailed as exc:
                    if declined is not None and exc.code != Code.DEADLINE_EXCEEDED:
                        declined()  # the replica's own status before its start
                    # a stall of its own, not a wait for a slot that calls decoding there hold
                    own_stall = isinstance(exc, _Stalled) and not self.loads.slots_taken(replica)
                    if own_stall:  # its rate is at most what it showed
                        self.loads.stalled(replica, ticket, self._clock())
                    if own_stall and lost_prefix_explains_stall(
                        match, prompt_tokens, needs_s, cold_s
                    ):
                        # predicted warm, no first report long past that prefill, and a cold
                        # prefill there would itself have stalled: its engine may not hold the
                        # prefix (a restart, unseen traffic), and this call makes no commit
                        # whose report would tell the view so
                        stalled_warm.append(replica)
                    blamed = True
                    if exc.code == Code.DEADLINE_EXCEEDED:
                        self._left(spec, wanted, replica, ticket)
                        blamed = self._judge_deadline(
                            spec.id, replica, probe, opened_at, timeout_s, needs_s
                        )
                    else:
                        self.loads.failed(replica, ticket)
                        self.replica_failed(spec.id, replica, probe)
                    chat_span.record_exception(exc)
                    spans.record_failure(chat_span, exc)
                    chat_span.end()
                    if blamed:  # not a caller's deadline too short for the call, nor one
                        # spent behind the replica's other answers: an operator's WARNING
                        self._log_failed(replica, spec.id, exc.code)
                    why = exc.reason
                    if not why and exc.code == Code.DEADLINE_EXCEEDED:
                        why = f"no answer within {timeout_s:.1f} s"
                    failures.append(f"{spec.id}: {exc.code.name}" + (f" ({why})" if why else ""))
                    waits.append(
                        None
                        if exc.retry_after_s is None
                        else (exc.retry_after_s, not exc.backoff_wait)
                    )
                    retried.append(exc.retried)
                    continue
                except BaseException as exc:
                    self._left(spec, wanted, replica, ticket)
                    health.released(replica, probe)  # the caller left: no verdict
                    if isinstance(exc, Exception):  # not a cancel: as use_span records it
                        chat_span.record_exception(exc)
                        why = f"{type(exc).__name__}: {exc}"
                        chat_span.set_status(trace.Status(trace.StatusCode.ERROR, why))
                    chat_span.end()
                    raise
                if start.HasField("tenant_fair_queue"):  # an older replica does not say
                    self.loads.queue_reported(replica, start.tenant_fair_queue)
                if start.cut_before_first_token:
                    # its deadline came before any token, after its provider reported the
                    # prompt (billed by the start and end that follow): no first report
                    self.loads.cut_unstarted(replica, ticket)
                    self._judge_deadline(spec.id, replica, probe, opened_at, timeout_s, needs_s)
                    # a provider stalling every call so: a line an interval, as failures are
                    if due := self._failed_log.due(replica, "cut_before_first_token"):
                        log.warning(
                            "replica %s of %s: no token within the deadline (%.1f s) after its "
                            "provider reported the prompt (billed as reported)%s",
                            replica,
                            spec.id,
                            timeout_s,
                            suppressed(due, REPLICA_FAILED_LOG_EVERY_MS),
                        )
                else:
                    reused = None if start.kv_cached_unreported else start.kv_cached_tokens
                    self.loads.started(replica, ticket, start.prompt_tokens, reused, self._clock())
                route = sent_route
                spans.route_attributes(chat_span, replica, route, start)
                planned_read = plan.usage.cache_read_input_tokens if plan is not None else None
                plan_id = plan.plan_id if plan is not None else ""
                planned_at = arrived_ms if plan is None else None  # no Plan: the router's
                if plan is not None and plan.HasField("planned_at_ms"):
                    planned_at = plan.planned_at_ms
                # for auto, whether another tier could take over a call cut mid-answer:
                # where the watch needs it (``watch``), asked at a silence
                takers = None
                if (
                    request.model == AUTO
                    and self._watched(spec)
                    and not set(replicas) - exclude - {replica}
                ):
                    takers = functools.partial(other_takes_over, spec.id)
                return Attempt(
                    spec,
                    reason,
                    replica,
                    stream,
                    start,
                    chat_span,
                    route,
                    planned_read,
                    plan_id,
                    opened_at,
                    timeout_s,
                    probe,
                    ticket,
                    planned_at,
                    takers=takers,
                    cut_before_first_token=start.cut_before_first_token,
                    routers_deadline=remaining_s is None or remaining_s > timeout_s,
                    stalled_warm=tuple(stalled_warm),
                )
        if too_large is not None and len(failures) == 1:
            raise too_large[1]  # no tier answered, and none but it failed
        remaining_s = self._remaining_s(deadline)
        if remaining_s is not None and remaining_s <= 0 and failures:
            raise _deadline_passed("the model", failures)
        if too_long and not failures:
            raise RequestError(
                Code.RESOURCE_EXHAUSTED,
                "no tier of auto can hold the prompt and its answer in its context window ("
                + "; ".join(too_long)
                + "); shorten the messages, system or tools"
                + (", or lower max_tokens" if room else ""),
            )
        only = (
            f"; its routing.threshold accepts only the {' or '.join(accepted)} tier "
            f"(not tried: {', '.join(refused)})"
            if refused
            else ""
        )
        # every replica tried refused saying a wait: the client's (before, none was said and
        # the SDKs retried at once)
        retry_after_s, by_provider = _client_wait(waits)
        # every replica tried had retried its provider already (its 529s, 503s): a retry of
        # the client's now would be as many provider calls again (3 tries a replica, times the
        # SDK's 3 attempts: 9 calls for one create()), so it is told to wait and not to retry
        # (``call_trailers.failed_call_trailers``: gRPC's server pushback, the HTTP front's
        # x-should-retry)
        spent = retry_after_s is not None and bool(retried) and all(retried)
        source = "as the provider asked" if by_provider else "a replica's backoff after its retries"
        if spent:
            after = (
                f"; each provider was retried already: retry in {retry_after_s} s at the earliest"
                + (f" ({source})" if by_provider else "")
            )
        else:
            after = "; retry later" + (
                f" (in {retry_after_s} s, {source})" if retry_after_s else ""
            )
        raise RequestError(
            Code.UNAVAILABLE,
            "no model replica could serve the request ("
            + "; ".join(dict.fromkeys(failures + too_long))
            + f"){only}{after}",
            retry_after_s=retry_after_s,
            retried=spent,
            backoff_wait=retry_after_s is not None and not by_provider,
        )

    def _usable_first(
        self, options: list[tuple[ModelSpec, str]], exclude: frozenset[str]
    ) -> list[tuple[ModelSpec, str]]:
        """``auto``'s tiers in their order, those whose replicas are all ejected after the
        others: another tier's healthy replica answers before one left out for its failures
        (each of which would cost the request its failure, or a hung one its deadline)."""
        now = self._clock()

        def ejected(spec: ModelSpec) -> bool:
            replicas = [r for r in self._deps.replicas(spec.id) if r not in exclude]
            usable, _ = self.health(spec.id).split(replicas, now)
            return bool(replicas) and not usable

        return sorted(options, key=lambda option: ejected(option[0]))

    def watch(self, attempt: Attempt, exclude: frozenset[str]) -> SilenceWatch | None:
        """The watch that cuts ``attempt`` if it goes silent mid-answer (None: it waits to its
        deadline): on a replica of the router's own engines (``_WATCHED_MID_ANSWER``), when
        another could take the request over (a replica of its model not in ``exclude``, cut on
        this request already; for ``auto``, one of another tier it accepts whose context
        window holds it: ``Attempt.takers``, asked at a silence): never the last one left."""
        if not self._watched(attempt.model):
            return None
        replica = attempt.replica
        others = set(self._deps.replicas(attempt.model.id)) - exclude - {replica}
        if not others and attempt.takers is None:
            return None
        prior = attempt.model.prior_prefill_rate or self._prior_tps

        def queued_s() -> float:
            rate = self.loads.rate(replica, prior).prefill_tokens_per_s
            return self.loads.pending_prefill_s(replica, rate)

        return SilenceWatch(
            self._silent_floor_s,
            queued_s,
            functools.partial(self.loads.progress, replica),
            self._clock,
            None if others else attempt.takers,
        )

    def _watched(self, spec: ModelSpec) -> bool:
        """Whether a call of ``spec``'s silent mid-answer may be cut: the cut is on, and its
        replicas are the router's own engines (``_WATCHED_MID_ANSWER``)."""
        return (
            self._hand_over_stalls
            and self._silent_floor_s > 0
            and spec.provider in _WATCHED_MID_ANSWER
        )

    async def _window_tokens(
        self,
        request: pb.CompleteRequest,
        spec: ModelSpec,
        plan: pc.PlanResponse | None,
        counted: dict[str, int],
    ) -> int:
        """The prompt's tokens in ``spec``'s context window, for ``auto``'s check: its Plan's
        count; without a Plan (prefix-cache is down, or none made yet) the router's own, since
        without a count the replica of a tier too small would refuse the prompt (the request's
        fault) and end the request that another tier could hold. Counted with the tier's
        tokenizer, once a vocabulary (``counted``), off the loop (~0.7 us a token not cached by
        the tokenizer)."""
        if plan is not None:
            return plan.prompt_tokens
        tokenizer = self._tokenizers.for_spec(spec)
        if tokenizer.name not in counted:
            counted[tokenizer.name] = await asyncio.to_thread(count_prompt, request, tokenizer)
        return counted[tokenizer.name]

    def _log_failed(self, replica: str, model: str, code: Code) -> None:
        """A replica's failed call: its first of a status code at once, then a line a
        ``REPLICA_FAILED_LOG_EVERY_MS`` at most saying how many were not logged (each one is
        on its request's span, and counts toward the replica's ejection all the same)."""
        if due := self._failed_log.due(replica, code.name):
            more = suppressed(due, REPLICA_FAILED_LOG_EVERY_MS)
            log.warning("replica %s of %s failed: %s%s", replica, model, code.name, more)

    def replica_failed(self, model: str, replica: str, probe: bool) -> None:
        """The replica failed a call of this request (before its first token, or cut
        mid-answer): counted towards its ejection, which the request's span records."""
        ejection = self.health(model).failed(replica, self._clock(), probe)
        if ejection is None:
            return
        log.warning(
            "replica %s of %s ejected for %.1f s after %d failures in a row",
            replica,
            model,
            ejection.cool_off_s,
            ejection.failures,
        )
        trace.get_current_span().add_event(
            "cachemesh.replica_ejected",
            {
                "cachemesh.replica": replica,
                "cachemesh.replica_failures": ejection.failures,
                "cachemesh.eject_s": ejection.cool_off_s,
            },
        )
        if self._ejected is not None:
            self._ejected(model)

    def _judge_deadline(
        self,
        model: str,
        replica: str,
        probe: bool,
        opened_at: float,
        timeout_s: float,
        needs_s: float,
    ) -> bool:
        """The verdict on ``replica`` for a call whose deadline came before its first token
        (no start, or a start only for the prompt its provider reported): a failure when the
        call had the time it was predicted to need (a deadline shorter than that is the
        client's, not the replica's fault) and the replica gave no sign of life meanwhile
        (one streaming other answers is busy, and this call waited behind them); else none.
        Whether the replica was blamed."""
        if timeout_s >= needs_s and not self._busy(replica, opened_at, needs_s):
            self.replica_failed(model, replica, probe)
            return True
        self.health(model).released(replica, probe)
        return False

    def _handover_s(
        self,
        spec: ModelSpec,
        wanted: Request,
        replica: str,
        needs_s: float,
        timeout_s: float,
    ) -> float | None:
        """When a call to ``replica`` without its first report is stalled (a hung engine) and
        the request goes to the next replica, while the deadline leaves time (None: it has the
        whole deadline). Only for a replica whose abandoned call is billed to no one
        (``_UNBILLED_BEFORE_START``), never the last one tried (the caller's to tell), and only
        on a prediction worth timing: the replica's measured rate, or its row's prior (the
        router's global prior, meant for hosted providers, would make a slow engine stall on
        every call)."""
        if not self._hand_over_stalls or spec.provider not in _UNBILLED_BEFORE_START:
            return None
        known = wanted.prior_prefill_tps is not None or self.loads.rate(replica, 1.0).samples > 0
        stall_s = stalled_after_s(needs_s)
        return stall_s if known and stall_s < timeout_s else None

    async def _one_not_overdue(
        self,
        wanted: Request,
        replicas: Sequence[str],
        stalled: str,
        opened_at: float,
        needs_s: float,
    ) -> bool:
        """Whether one of ``replicas`` (those a call to ``stalled``, opened at ``opened_at``
        and predicted ``needs_s``, would be handed over to) is not slow the same way: neither
        overdue itself (``ReplicaStates.overdue``) nor, while ``stalled``'s prediction is its
        row's prior (no rate measured there yet), shown by its own rate, measured since the
        call opened, to be slower than that prior, so much that at its rate the call is no
        stall yet (``stalled_after_s`` of ``needs_s`` scaled by the two rates). When each is,
        the stall is no one engine's (a loaded machine, a prior rate too fast for the engines):
        handed over, the request would wait as long there and its engine prefill the prompt
        twice (two calls sent at once to two slow replicas were swapped; when one of them gave
        its first report just before the other's window ended, not overdue then but as slow,
        the other's call went to it too: both conversations on one replica), so it is watched
        for another stall window where it is. That slower-sibling hold is granted once per
        measure: only within one stall window of the call after the sibling's rate was
        measured, and only if that was after the call opened. With no other traffic on the
        sibling, a hung engine's call so leaves one window after it left before the hold (at
        the first ask after the sibling stopped being overdue), however slow the sibling
        (before, it waited till twice the call's prediction at the sibling's rate: a sibling
        measured 52x slower kept it 1.08 s, not 0.06 s; one measured 2,000x slower by an
        earlier, finished call, to its deadline). Under traffic each fresh measure of the
        sibling grants one more window, up to ``stalled_after_s`` of ``needs_s`` scaled by the
        two rates, never past the call's deadline."""
        now = self._clock()
        prior = self._chooser.prior(wanted)
        predicted = self.loads.rate(stalled, prior)
        # asks come a window apart (``_stalled_after``): one at most falls within a window
        # of a measure
        window_s = stalled_after_s(needs_s)

        def as_slow(replica: str) -> bool:
            rate = self.loads.rate(replica, prior)
            tps = rate.prefill_tokens_per_s
            if self.loads.overdue(replica, tps, now):
                return True
            # only against a prior: a replica measured faster than another keeps its window
            # (a hung fast engine's call is not held to a slower one's pace)
            if (
                predicted.samples > 0
                or rate.samples == 0
                or rate.sampled_at <= opened_at
                or now - rate.sampled_at >= window_s
                or not 0 < tps < predicted.prefill_tokens_per_s
            ):
                return False
            scaled_s = needs_s * predicted.prefill_tokens_per_s / tps
            return now - opened_at <= stalled_after_s(scaled_s)

        return any(not as_slow(r) for r in replicas)

    def _left(self, spec: ModelSpec, wanted: Request, replica: str, ticket: int) -> None:
        """The call was left before its first report (its caller, or its deadline): a
        self-hosted engine prefills its prompt all the same, so the replica's queue keeps
        that prefill until its predicted end (``ReplicaStates.abandoned``); another's call is
        forgotten."""
        if spec.provider not in _PREFILLS_WHEN_LEFT:
            self.loads.failed(replica, ticket)
            return
        rate = self.loads.rate(replica, self._chooser.prior(wanted)).prefill_tokens_per_s
        self.loads.abandoned(replica, ticket, rate, self._clock())

    def _busy(self, replica: str, opened_at: float, needs_s: float) -> bool:
        """Whether ``replica`` gave a sign of life on its other calls (a first report, a
        token) since a call opened at ``opened_at``, within the stall window before now, or
        its slots are all taken by answers decoding there (``ReplicaStates.slots_taken``: the
        router reads them only as their callers do)."""
        since = max(opened_at, self._clock() - stalled_after_s(needs_s))
        return self.loads.progressed_since(replica, since) or self.loads.slots_taken(replica)

    def _remaining_s(self, deadline: float | None) -> float | None:
        """The time a model call may take now (None: no client deadline)."""
        return None if deadline is None else deadline - self._clock()


class _Stalled(CallFailed):
    """A call handed over for want of a sign of life (``_stalled_after``)."""


class Silent(CallFailed):
    """A call cut for its silence mid-answer (``SilenceWatch``): its replica hung there."""

    def __init__(self, silent_s: float) -> None:
        super().__init__(Code.UNAVAILABLE, f"no chunk for {silent_s:.1f} s mid-answer")
        self.silent_s = silent_s


class SilenceWatch:
    """One model call's watch for silence mid-answer: ``read`` is the call's next chunk, or
    raises ``Silent`` once the replica has sent nothing on it for ``silent_after_s`` (its pace
    so far on the injected clock, the floor, the prefill queued there) and given no sign of
    life on its other calls meanwhile (``progress``: a replica streaming other answers is
    busy, not hung: the silence starts again at the look that sees one). The stream is left
    to the caller to cancel. One timer a call, on the event loop's clock, looking
    ``_SILENCE_LOOKS`` times a silence allowed while a read waits (a chunk costs no timer of
    its own); it cancels the reading task, and ``read`` turns that into ``Silent`` (a
    cancellation of anyone else's goes on). ``takers`` (None: another replica of the model is
    left): whether another tier could take the request over, asked at the first silence (it
    may count the prompt, so never before): if none could, the call is not cut and waits on,
    as the last one left."""

    def __init__(
        self,
        floor_s: float,
        queued_s: Callable[[], float],
        progress: Callable[[], int],
        clock: Callable[[], float],
        takers: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._floor_s = floor_s
        self._queued_s = queued_s
        self._progress = progress
        self._clock = clock
        self._takers = takers
        self._may_cut: bool | None = None if takers is not None else True  # None: not asked
        self._asking: asyncio.Task[None] | None = None
        self._began = clock()  # the first report (the prefill's end)
        self._last = self._began  # the last chunk
        self._chunks = 0
        self._task: asyncio.Task[object] | None = None
        self._reading_since: float | None = None  # loop time; None: not waiting on a read
        self._window: float = 0.0  # loop time since which no sign of life is seen
        self._seen = 0  # the replica's progress then
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time the timer was set for
        self._silent_s: float | None = None

    def limit_s(self) -> float:
        pace_s = (self._last - self._began) / self._chunks if self._chunks else 0.0
        return silent_after_s(pace_s, self._floor_s, self._queued_s())

    async def read(self, stream: ModelStream) -> model_pb2.GenerateChunk | None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._reading_since = self._window = loop.time()
        self._seen = self._progress()
        if self._timer is None and self._may_cut is not False:
            self._arm(loop, self._window + self.limit_s() / _SILENCE_LOOKS)
        try:
            chunk = await stream.read()
        except asyncio.CancelledError:
            task, silent_s = self._task, self._silent_s
            # the watch's own cancellation, no one else's (a caller leaving too goes on)
            if silent_s is not None and task is not None and task.uncancel() == 0:
                raise Silent(silent_s) from None
            raise
        finally:
            self._reading_since = None
        self._chunks += 1
        self._last = self._clock()
        return chunk

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._asking is not None:
            self._asking.cancel()

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._due = at
        self._timer = loop.call_at(at, self._check)

    def _check(self) -> None:
        self._timer = None
        since = self._reading_since
        if since is None or self._task is None or self._silent_s is not None:
            return  # no read waiting: the next one arms the timer again
        loop = asyncio.get_running_loop()
        now = loop.time()
        limit_s = self.limit_s()
        look_s = limit_s / _SILENCE_LOOKS
        paused = paused_s(self._due, now, limit_s)
        if paused:  # the router did not run (``own_pause``): no silence of the replica's
            self._window += paused  # and a look again once the stream could hand chunks over
            self._arm(loop, now + look_s)
            return
        progress = self._progress()
        if progress != self._seen:  # a sign of life on another call since the last look
            self._seen, self._window = progress, now
        due = self._window + limit_s
        if now < due:
            self._arm(loop, min(due, now + look_s))
            return
        if self._may_cut is None:  # silent: asked once whether another tier could take over
            if self._asking is None:
                self._asking = asyncio.ensure_future(self._ask())
            return
        if not self._may_cut:
            return  # none could: the call waits on, as the last one left
        self._silent_s = now - since
        self._task.cancel()

    async def _ask(self) -> None:
        """Asks ``takers`` (at the first silence); if another tier could take the request
        over, the silence is looked at again (a chunk may have come meanwhile)."""
        assert self._takers is not None
        try:
            self._may_cut = await self._takers()
        except Exception:
            log.exception("whether another tier could take over a silent call: not cut")
            self._may_cut = False
        if self._may_cut and self._timer is None and self._reading_since is not None:
            loop = asyncio.get_running_loop()
            self._arm(loop, loop.time())


async def _stalled_after(
    call: Awaitable[_T],
    handover_s: float | None,
    needs_s: float,
    progress: Callable[[], int],
    hand_over: Callable[[], Awaitable[bool]] | None = None,
    *,
    watch_again: bool = False,
) -> _T:
    """``call``'s result; if its replica gives no sign of life at all for ``handover_s``
    (None: no limit) — ``progress``, its count of first reports and tokens on any of its
    calls, stays the same — it is cancelled (its stream with it) and fails as
    DEADLINE_EXCEEDED, a stall; unless ``hand_over``, asked then, says no other replica could
    take the request over (None: one could): the call waits on, as the last one left, or,
    ``watch_again``, for another ``handover_s`` before it is asked again (the others were as
    slow then). A replica streaming other answers is busy, not hung: a call waiting behind
    them there waits on (within its deadline)."""
    if handover_s is None:
        return await call
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    try:
        while True:
            seen = progress()
            due = loop.time() + handover_s
            done, _ = await asyncio.wait((task,), timeout=handover_s)
            if done:
                return task.result()
            if progress() != seen:
                continue
            if paused_s(due, loop.time(), handover_s):
                continue  # the router did not run (``own_pause``): its reports may be unread
            if hand_over is not None and not await hand_over():
                if watch_again and not task.done():
                    continue  # the others were as slow: another window where it is
                return await task  # no other replica could take the request: it waits on
            if task.done():
                return task.result()  # it answered while that was asked
            break
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    raise _Stalled(
        Code.DEADLINE_EXCEEDED,
        "stalled before its first report",
        f"no first report, and no token on its other calls, within {handover_s:.1f} s, "
        f"{needs_s:.1f} s predicted; handed over to the next replica",
    )


def _deadline_passed(what: str, failures: list[str]) -> RequestError:
    tried = f" ({'; '.join(dict.fromkeys(failures))})" if failures else ""
    return RequestError(
        Code.DEADLINE_EXCEEDED,
        f"the request's deadline passed before {what} could answer{tried}; retry with a "
        "longer deadline",
    )
