"""Which model and replica serve a miss, and the model call up to its first token.

The tier comes from the learned router (``routing``; or the requested model); the replica from
the configured replica policy (``replica_choice``: predicted time to first token by default) over
prefix-cache's view of the replicas and the router's own record of their queues and measured
rates (``replica_state``); a replica that fails before its first token hands the request to the
next one, and for ``auto`` to the other tiers (nearest in price first), as does a simulated or
self-hosted one that stalls (no first report long past its predicted prefill, and no token on
its other calls meanwhile: a replica streaming answers is busy, not hung). A replica whose
calls keep failing is left out for a cool-off (``replica_health``), unless all are.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.tokens import Tokenizer, Tokenizers
from services.router import spans
from services.router.balance import Route
from services.router.calls import CLIENT_FAULTS, Calls, PrefixWindow
from services.router.dependencies import CallFailed, Dependencies, ModelStream
from services.router.prompt_counts import count_prompt
from services.router.replica_choice import ChoiceSettings, ReplicaChooser, Request
from services.router.replica_health import ReplicaHealth
from services.router.replica_state import ReplicaStates, stalled_after_s
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
_T = TypeVar("_T")


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
    # when the Plan looked the cache up, on prefix-cache's clock (None: no Plan, or an older
    # prefix-cache that does not say): a replayed WARM is settled as of then
    planned_at_ms: int | None = None
    # Each model call is billed under its own id: a retry after a cancelled or failed call is
    # a new provider call, while retries of the same Commit stay idempotent.
    attempt_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def commit_key(self, request_id: str) -> str:
        return f"{request_id}#{self.attempt_id}"


def fallback_tiers(tiers: tuple[str, ...], chosen: str) -> list[str]:
    """The other tiers, nearest in price first; of two as near, the dearer (no loss of
    quality) first."""
    at = tiers.index(chosen)
    others = [i for i in range(len(tiers)) if i != at]
    return [tiers[i] for i in sorted(others, key=lambda i: (abs(i - at), -i))]


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
    ) -> None:
        """``tokenizer``: each row's (or one for all), counts the prompt for ``auto``'s
        context-window check when prefix-cache made no Plan (it is down); ``ejected``: the
        ejections' metric, by model (None: a router built without metrics);
        ``hand_over_stalls``: a stalled call's hand-over (its timer runs in real time: off
        for a replay on a virtual clock)."""
        self._ejected = ejected
        self._hand_over_stalls = hand_over_stalls
        self._calls = calls
        self._tokenizers = Tokenizers.of(tokenizer)
        self._deps = dependencies
        self._table = table
        self._tracer = tracer
        self._clock = clock
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
    ) -> Attempt:
        """Starts the model call on the first replica that answers (prefill done); an
        ``auto`` request goes to ``routed``'s tier first, reusing the Plans it made; replicas
        in ``exclude`` (cut mid-answer on this request) are not tried. ``deadline`` (on this
        dispatcher's clock): when the model must have answered by, for the client's deadline;
        it bounds each call (its replica's retries with it), and once it has passed no other
        replica is tried (DEADLINE_EXCEEDED). ``window``: the request's prefix-cache calls (None:
        this call's own, within ``deadline``)."""
        if window is None:
            window = PrefixWindow(deadline)
        plans = routed.plans if routed is not None else {}
        if request.model == AUTO:
            assert routed is not None
            choice = routed.decision
            first = self._table.for_tier(choice.tier)
            options = [(first, choice.reason)] + [
                (self._table.for_tier(tier), f"fallback: {first.id} unavailable")
                for tier in fallback_tiers(self._table.tiers, choice.tier)
            ]
        else:
            spec = self._table.get(request.model)
            assert spec is not None
            options = [(spec, "requested")]
        failures: list[str] = []
        # auto's tiers whose context window cannot hold the prompt and max_tokens of answer
        too_long: list[str] = []
        room = False  # one of them holds the prompt, not max_tokens of answer with it
        # the router's own counts of the prompt (no Plan), by vocabulary
        counted: dict[str, int] = {}
        for spec, reason in options:
            replicas = self._deps.replicas(spec.id)
            if not set(replicas) - exclude:
                continue
            plan = (
                plans[spec.id]
                if spec.id in plans
                else await self._calls.plan(tenant, spec.id, request, replicas, window)
            )
            facts = plan.prompt if plan is not None and plan.HasField("prompt") else None
            prompt_tokens = plan.prompt_tokens if plan is not None else 0
            window_tokens = prompt_tokens
            if request.model == AUTO and plan is None:
                # prefix-cache is down: without a count the replica of a tier too small
                # would refuse the prompt (the request's fault) and end the request that
                # another tier could hold. Counted with the tier's tokenizer, once a
                # vocabulary, off the loop (~0.7 us a token not cached by the tokenizer).
                tokenizer = self._tokenizers.for_spec(spec)
                if tokenizer.name not in counted:
                    counted[tokenizer.name] = await asyncio.to_thread(
                        count_prompt, request, tokenizer
                    )
                window_tokens = counted[tokenizer.name]
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
                    "fallback: the prompt and max_tokens are over the context window of "
                    f"{options[0][0].id}"
                )
            view = {c.replica: c.warm_prefix_tokens for c in plan.candidates} if plan else {}
            raw = facts.kv_block_hashes if facts is not None else b""
            hashes = [raw[i : i + _HASH_BYTES] for i in range(0, len(raw), _HASH_BYTES)]
            wanted = Request(spec.id, prompt_tokens, hashes, spec.prior_prefill_rate)
            # the ejected replicas only when all are (then the choice is among them), else
            # after the others, as a last resort
            now = self._clock()
            health = self.health(spec.id)
            usable, ejected = health.split([r for r in replicas if r not in exclude], now)
            route = self._chooser.choose(wanted, usable or ejected, view, now)
            if usable and ejected:
                route = replace(route, ejected=tuple(ejected))
            candidates = (*route.order, *(ejected if usable else ()))
            for n, replica in enumerate(candidates, 1):
                remaining_s = self._remaining_s(deadline)
                if remaining_s is not None and remaining_s <= 0:
                    raise _deadline_passed(spec.id, failures)
                timeout_s = self._calls.model_timeout_s(remaining_s)
                chat_span = spans.start_chat_span(self._tracer, spec.id, replica, spec.provider)
                match = route.match_tokens if replica == route.order[0] else view.get(replica, 0)
                opened_at = self._clock()
                needs_s = self._chooser.predicted_ttft_s(wanted, replica, match, opened_at)
                last = n == len(candidates)
                handover_s = self._handover_s(spec, wanted, replica, needs_s, timeout_s, last)
                probe = health.sending(replica, opened_at)
                ticket = self.loads.sent(
                    replica,
                    prompt_tokens,
                    prompt_tokens - match,
                    hashes,
                    opened_at,
                    request.max_tokens,
                    spec.replica_slots,
                )
                try:
                    with trace.use_span(chat_span, end_on_exit=False):
                        stream, start = await _stalled_after(
                            self._calls.generate(
                                tenant, spec.id, request, replica, facts, timeout_s
                            ),
                            handover_s,
                            needs_s,
                            functools.partial(self.loads.progress, replica),
                        )
                except RequestError as exc:
                    self.loads.failed(replica, ticket)
                    if exc.code in CLIENT_FAULTS:
                        health.released(replica, probe)  # its refusal is the request's
                    else:
                        self.replica_failed(spec.id, replica, probe)
                    chat_span.end()
                    raise
                except CallFailed as exc:
                    if isinstance(exc, _Stalled):  # its rate is at most what it showed
                        self.loads.stalled(replica, ticket, self._clock())
                    if exc.code == Code.DEADLINE_EXCEEDED:
                        self._left(spec, wanted, replica, ticket)
                    else:
                        self.loads.failed(replica, ticket)
                    # out of its own time: it had the time it was predicted to need (a
                    # deadline shorter than that is the client's, not the replica's fault)
                    # and gave no sign of life meanwhile (one streaming other answers is
                    # busy, and this call waited behind them)
                    if exc.code != Code.DEADLINE_EXCEEDED or (
                        timeout_s >= needs_s and not self._busy(replica, opened_at, needs_s)
                    ):
                        self.replica_failed(spec.id, replica, probe)
                    else:
                        health.released(replica, probe)
                    spans.record_failure(chat_span, exc)
                    chat_span.end()
                    log.warning("replica %s of %s failed: %s", replica, spec.id, exc.code.name)
                    why = exc.reason
                    if not why and exc.code == Code.DEADLINE_EXCEEDED:
                        why = f"no answer within {timeout_s:.1f} s"
                    failures.append(f"{spec.id}: {exc.code.name}" + (f" ({why})" if why else ""))
                    continue
                except BaseException:
                    self._left(spec, wanted, replica, ticket)
                    health.released(replica, probe)  # the caller left: no verdict
                    chat_span.end()
                    raise
                reused = None if start.kv_cached_unreported else start.kv_cached_tokens
                self.loads.started(replica, ticket, start.prompt_tokens, reused, self._clock())
                if replica != route.order[0]:
                    route = Route(route.order, match, "fallback", 0, ejected=route.ejected)
                route = replace(route, probe=probe)
                spans.route_attributes(chat_span, replica, route, start)
                planned_read = plan.usage.cache_read_input_tokens if plan is not None else None
                plan_id = plan.plan_id if plan is not None else ""
                planned_at = (
                    plan.planned_at_ms
                    if plan is not None and plan.HasField("planned_at_ms")
                    else None
                )
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
                )
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
        raise RequestError(
            Code.UNAVAILABLE,
            "no model replica could serve the request ("
            + "; ".join(dict.fromkeys(failures + too_long))
            + "); retry later",
        )

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

    def _handover_s(
        self,
        spec: ModelSpec,
        wanted: Request,
        replica: str,
        needs_s: float,
        timeout_s: float,
        last: bool,
    ) -> float | None:
        """When a call to ``replica`` without its first report is stalled (a hung engine) and
        the request goes to the next replica, while the deadline leaves time (None: it has the
        whole deadline). Only for a replica whose abandoned call is billed to no one
        (``_UNBILLED_BEFORE_START``), never the last one tried, and only on a prediction worth
        timing: the replica's measured rate, or its row's prior (the router's global prior,
        meant for hosted providers, would make a slow engine stall on every call)."""
        if not self._hand_over_stalls or last or spec.provider not in _UNBILLED_BEFORE_START:
            return None
        known = wanted.prior_prefill_tps is not None or self.loads.rate(replica, 1.0).samples > 0
        stall_s = stalled_after_s(needs_s)
        return stall_s if known and stall_s < timeout_s else None

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
        token) since a call opened at ``opened_at``, within the stall window before now."""
        since = max(opened_at, self._clock() - stalled_after_s(needs_s))
        return self.loads.progressed_since(replica, since)

    def _remaining_s(self, deadline: float | None) -> float | None:
        """The time a model call may take now (None: no client deadline)."""
        return None if deadline is None else deadline - self._clock()


class _Stalled(CallFailed):
    """A call handed over for want of a sign of life (``_stalled_after``)."""


async def _stalled_after(
    call: Awaitable[_T], handover_s: float | None, needs_s: float, progress: Callable[[], int]
) -> _T:
    """``call``'s result; if its replica gives no sign of life at all for ``handover_s``
    (None: no limit) — ``progress``, its count of first reports and tokens on any of its
    calls, stays the same — it is cancelled (its stream with it) and fails as
    DEADLINE_EXCEEDED, a stall. A replica streaming other answers is busy, not hung: a call
    waiting behind them there waits on (within its deadline)."""
    if handover_s is None:
        return await call
    task = asyncio.ensure_future(call)
    try:
        while True:
            seen = progress()
            done, _ = await asyncio.wait((task,), timeout=handover_s)
            if done:
                return task.result()
            if progress() == seen:
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
