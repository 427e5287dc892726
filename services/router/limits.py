"""Per-tenant limits at the Gateway: request rate, token rate, dollar budgets a day and a month.

A grpc-free core. ``Limiter.admit`` runs before a request reaches the pipeline; a tenant over
its limits is refused with a ``Denial`` (what was exceeded, and how long to wait: every limit
is checked, and the wait is the longest), which the servicer turns into
``RESOURCE_EXHAUSTED`` with ``google.rpc.RetryInfo``.

- Request rate: a bucket of ``requests_per_min`` requests, refilled continuously; each request
  takes one. Under a token rate, a request whose prompt is large (``READ_FIRST_CHARS``) has
  the request rate and the budgets read first (``LimitStore.refusal_before_count``): over the rate
  or a spent budget, it is refused before its prompt is counted (a flood of large prompts past
  the rate, or from a tenant whose budget is spent until the day or the month ends, had the
  router tokenize each, on the CPU every tenant shares, only to refuse it), and its refusal
  names the request rate and the budgets it is over, not the token rate, which needs the
  count. A smaller prompt is counted first, as its count costs less than that read's round
  trip to the store, and its refusal names every limit it is over.
- Token rate: a bucket of ``tokens_per_min`` tokens. A request reserves its prompt's tokens (the
  canonical prompt counted by the router's tokenizer, as an L1 hit's baseline is) plus its
  ``max_tokens`` (the row's ``max_output_tokens`` when the row thinks outside ``max_tokens``:
  ``ModelSpec.most_output_tokens``, as the budgets' hold), and is admitted while the bucket
  holds that reservation, or is full when the reservation is larger than the bucket (else it
  could never pass; it takes the bucket below zero, and later requests wait for the refill).
  When it ends the reservation is replaced by what it used: input tokens, cache writes and
  output tokens that reached a model (cache reads are not counted, as Anthropic's cache-aware
  limits do not; a semantic-cache hit counts as a request, no tokens).
  A request that ends with no answer before its first model call was sent (cancelled, out of
  time or refused during its L1 Lookup, a wait on an identical request's call, its Plan, or
  its admit itself) gives its reservation back whole (``Limiter.unused``, by the rule of
  ``Limiter.finish`` that the Gateway and the estimator's replay both count an end with): it
  used no model tokens; so does one whose model calls were all refused by their replicas
  before their start (nothing produced, nothing billed: ``ModelUse.model_refused``). One that
  fails or is cut after a model call that was not refused so keeps its reservation, unless its
  call was billed without an answer (the caller left, or the replica was cut, after the
  prefill): the billed tokens replace it.
- Budgets: a request is admitted while the tenant's bill for the current UTC day (month) is
  below the budget; each answer adds its ``cost_nanos`` (the prefix-cache bill, or the
  estimate the router serves when prefix-cache is down, counted as the outbox journals the
  bill, ``Limiter.count_estimate``, and corrected by what prefix-cache bills when the outbox
  replays it: ``Limiter.reconcile``). Under a budget each request also holds, while it runs,
  the largest bill it can make (``Hold``: its prompt at the dearest of the row's input and
  cache-write prices, and its ``max_tokens`` at the output price; ``auto``'s: the largest
  of its tiers'), and is admitted only while the bill plus what the tenant's requests in
  flight hold is below the budget: N requests racing the last dollar of a budget took it
  past by N bills (39 answers in flight: $0.0449 against a $0.01 budget), now by at most
  one. Its end gives the hold back (with its cost counted, in one settle); a hold whose
  router died lapses a minute after its request's deadline (``hold_ms``; ``HOLD_MS`` without
  one). The last request admitted may still take the bill past the budget (by at most its
  own bill); the next one is refused until the period ends.

The state lives in a ``LimitStore`` (``limit_store``): in this process (``MemoryLimitStore``,
``memory_limits``), or in Redis (``redis_limits``) so that every router of a deployment shares
it. A tenant's limits and the store's verdicts are ``limit_policy``'s; a refusal's message,
``limit_denials``'s.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from services.common.background import TASKS_END_S, cancel_within
from services.common.clock import Clock, MonotonicClock, Throttles, suppressed
from services.common.prompt import prompt_chars
from services.common.span_events import record_event
from services.router.breaker import Breaker
from services.router.limit_denials import Denial, denial
from services.router.limit_policy import Periods, Policies, Refusal
from services.router.limit_settles import (
    MAX_PENDING_SETTLES,
    SETTLE_REPLAY_S,
    PendingSettles,
    Settle,
)
from services.router.limit_store import Admission, Hold, LimitStore, Settlement, hold_ms
from services.router.limit_tickets import ModelUse, Ticket, model_tokens, used_tokens

log = logging.getLogger("cachemesh.router.limits")

DEFAULT_TIMEOUT_S = 0.5  # ROUTER_LIMITS_TIMEOUT_S
# A prompt of at least this many characters has the request rate and the budgets read before
# it is counted (module doc): tokenizing 16 KiB of new text takes ~0.8 ms (~50 ms a
# megabyte), a few Redis round trips.
READ_FIRST_CHARS = 16_384
# a store failure (on admit, on settle) of one kind is logged at most once in this interval, the
# first at once: a Redis down at 100 requests a second was 200 WARNING lines a second
FAILED_LOG_INTERVAL_MS = 10_000


def _measured(
    request: pb.CompleteRequest,
    count: Callable[[pb.CompleteRequest], int],
    bound: Callable[[pb.CompleteRequest, int], int] | None,
) -> tuple[int, int | None]:
    """``request``'s prompt tokens, and the largest bill it can make (None: no ``bound``),
    both off the event loop (a thread's)."""
    prompt = count(request)
    return prompt, None if bound is None else bound(request, prompt)


class Limiter:
    """Admits or refuses a tenant's request; settles its tokens and cost when it ends.

    A store that fails (Redis down) does not stop the Gateway: the request is admitted with
    nothing reserved (its end takes the tokens it used, gives none back), and the failure
    logged and recorded on the request's span (``cachemesh.degraded``). A settle that fails
    waits in a bounded queue and is sent again until the store answers (``replay_pending``),
    each under its own id so that the store counts it once."""

    def __init__(
        self,
        store: LimitStore,
        policies: Policies,
        clock: Clock,
        prompt_tokens: Callable[[pb.CompleteRequest], int],
        tracer: trace.Tracer | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        counted: Callable[[str, str], None] | None = None,
        lost: Callable[[int], None] | None = None,
        max_pending: int = MAX_PENDING_SETTLES,
        replay_every_s: float = SETTLE_REPLAY_S,
        breaker: Breaker | None = None,
        ages: Clock | None = None,
        cost_bound: Callable[[pb.CompleteRequest, int], int] | None = None,
        output_bound: Callable[[pb.CompleteRequest], int] | None = None,
    ) -> None:
        """``cost_bound``: the largest bill a request of so many prompt tokens can make, which
        it holds of its tenant's budgets while it runs (``Hold``; None: nothing held, and a
        budget admits every request while the spend is below it); called off the event loop
        with the count, as it may count the prompt in another row's vocabulary.
        ``output_bound``: the most output a request can write, which the token rate reserves
        with its prompt (None: its ``max_tokens``; a row thinking outside it writes more).
        ``clock``: the wall clock, for the budget periods and when a cost was incurred.
        ``ages``: what this process's own windows run on (a settle's replay window and its
        ambiguous one, the throttled log lines), which a step of the wall clock (NTP, a VM
        resumed) must neither stretch nor cut (None: a ``MonotonicClock``).
        ``prompt_tokens``: a request's prompt tokens (the router's tokenizer; the pipeline
        reuses the count, ``prompt_counts``), counted off the event loop and only under a
        token rate or, with ``cost_bound``, a budget. ``tracer``: for a settle that fails
        after its request's span ended.
        ``timeout_s``: how long a store's answer is waited for before it counts as failed (a
        Redis that hangs would otherwise hold every request for its client's socket
        timeout). ``counted``: each failure, as ``(dependency, reason)`` (the router's
        ``cachemesh_router_degraded_total``; requests admitted unlimited must show).
        ``lost``: settles dropped (``max_pending`` of them waiting already, or not sent within
        ``SETTLE_REPLAY_WINDOW_MS``), their number; ``replay_every_s``: how often the pending
        ones are tried while the store fails. ``breaker``: after admits that failed in a row,
        none is sent to the store for a while (each request admitted as when it fails, without
        the wait); None: every admit is sent. Settles are sent (and queued) as ever."""
        self._breaker = breaker
        self._cost_bound = cost_bound
        self._output_bound = output_bound
        self._counted = counted
        self._ages = ages if ages is not None else MonotonicClock()
        self._settles = PendingSettles(self._send, self._ages, lost, max_pending, replay_every_s)
        self._failed_log = Throttles(self._ages, FAILED_LOG_INTERVAL_MS)
        self._store = store
        self._policies = policies
        self._clock = clock
        self._prompt_tokens = prompt_tokens
        self._tracer = tracer
        self._timeout_s = timeout_s
        self._background: set[asyncio.Task[None]] = set()
        # settles a drain gave up on (``drain``): not waited for again by the next one
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def admit(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        *,
        time_remaining_s: float | None = None,
    ) -> Ticket | Denial:
        """The request's ticket, or its denial (``time_remaining_s``: its deadline, the most
        its hold on the budgets lasts if its end is never told, ``hold_ms``). Every limit is
        checked at once by the store's ``admit``, which takes the request and its tokens
        atomically (a refusal takes neither). Under a token rate (or a budget, to hold the
        largest bill) the prompt is counted (off the event loop); a large prompt
        (``READ_FIRST_CHARS``) has the request rate and the budgets read before: a request
        over the rate or a spent budget is refused uncounted."""
        policy = await self._policies.admitting(tenant)
        if not policy.active:
            return Ticket(tenant, policy, 0, counts_spend=self._policies.counts_every_spend())
        if self._breaker is not None and self._breaker.open():
            self._left_alone()
            return Ticket(tenant, policy, 0)  # nothing reserved: as when the store fails
        prompt = reserve = 0
        bound = self._cost_bound if policy.budgeted else None  # a budget holds the largest bill
        hold: Hold | None = None
        try:
            if policy.tokens_per_min is not None or bound is not None:
                readable = policy.requests_per_min is not None or policy.budgeted
                if readable and read_first(request):
                    over = await self._ask(
                        lambda now, periods: self._store.refusal_before_count(
                            tenant, policy, now, periods
                        )
                    )
                    if over is not None:
                        return denial(over, policy, 0, request.max_tokens)
                prompt, nanos = await asyncio.to_thread(
                    _measured, request, self._prompt_tokens, bound
                )
                if policy.tokens_per_min is not None:
                    reserve = prompt + self._most_output(request)
                if nanos is not None:
                    hold = Hold(uuid.uuid4().hex, nanos, hold_ms(time_remaining_s))
            refusal = await self._ask(
                lambda now, periods: self._store.admit(
                    Admission(tenant, policy, reserve, now, periods, hold)
                ),
                Ticket(tenant, policy, reserve, hold=hold),
            )
        except _StoreFailed:
            # nothing known reserved, so nothing to give back: the request's end takes what it
            # used. A timeout is ambiguous (the store may have reserved after all); then the
            # reservation stays taken too, erring against the tenant, not erasing its debt. Its
            # hold, if taken, is released at its end all the same (nothing when it is not
            # there), else it lapses (HOLD_MS).
            return Ticket(tenant, policy, 0, hold=hold)
        if refusal is None:
            return Ticket(tenant, policy, reserve, hold=hold)
        return denial(refusal, policy, prompt, request.max_tokens, self._most_output(request))

    def _most_output(self, request: pb.CompleteRequest) -> int:
        """What the token rate reserves of ``request``'s output (``output_bound``)."""
        if self._output_bound is None:
            return request.max_tokens
        return self._output_bound(request)

    async def _ask(
        self,
        call: Callable[[int, Periods], Awaitable[Refusal | None]],
        taking: Ticket | None = None,
    ) -> Refusal | None:
        """The store's verdict on an admit, at the clock's time now; ``_StoreFailed`` when it
        fails or is silent (the store's own failure, never the request's). ``taking``: what
        the call reserves when it admits; a caller that leaves (cancelled) while it is out
        leaves it to end in the background, and gives its reservation back once it admitted
        (before, a request cancelled then kept its prompt and ``max_tokens`` reserved)."""
        now = self._clock.now_ms()
        asked = asyncio.ensure_future(call(now, Periods.at(now)))
        try:
            async with asyncio.timeout(self._timeout_s):
                refusal = await asyncio.shield(asked)
        except asyncio.CancelledError:  # the caller left (the timeout's is a TimeoutError)
            if taking is None or not (taking.reserved_tokens or taking.hold):
                asked.cancel()
            else:
                self._give_back_when_admitted(asked, taking)
            raise
        except Exception as exc:
            asked.cancel()
            if self._breaker is not None:
                self._breaker.failed()
            self._degraded("admit", exc)
            raise _StoreFailed from exc
        if self._breaker is not None:
            self._breaker.answered()
        return refusal

    def _give_back_when_admitted(
        self, asked: asyncio.Future[Refusal | None], ticket: Ticket
    ) -> None:
        """Gives ``ticket``'s reservation back once the store's admit ``asked`` (its request
        gone) admitted it; in the background, within ``timeout_s`` (``drain`` awaits it). One
        that fails or does not answer in time gives nothing back: it may have reserved or not,
        as when an admit times out, and the error is against the tenant."""

        async def when_admitted() -> None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    refusal = await asked
            except Exception as exc:  # the store's failure: counted by the next request's
                log.debug("limits store: the admit of a request that left failed (%s)", exc)
                self._count(ticket, 0, 0, release=True)  # if it held after all
                return
            if refusal is None:
                self._count(ticket, ticket.replace_reservation(), 0, release=True)

        task = asyncio.create_task(when_admitted(), name="limits-admit-left")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def settle(
        self, ticket: Ticket, end: pb.CompleteResponse | None, *, release: bool = False
    ) -> None:
        """Counts what an answered request used (``end``); a request with no answer keeps its
        reservation (one that sent no model call, or whose every model call was refused
        before its start, has it back: ``unused``, by ``finish``). Runs past the request
        (``drain`` awaits it). An estimated answer's cost is not counted here: the
        billing outbox counted its estimate as it journalled its bill (``count_estimate``), so
        that a router stopped before this settle (a slow caller reading the end) leaves no
        estimate uncounted under the replay's correction."""
        if not ticket.counted or end is None:
            return
        back = ticket.replace_reservation()
        refund = back - used_tokens(end) if ticket.policy.tokens_per_min else 0
        cost = 0 if end.cost.estimated else end.cost.cost_nanos
        self._count(ticket, refund, cost, release=release)

    def finish(
        self,
        ticket: Ticket,
        end: pb.CompleteResponse | None,
        use: ModelUse,
        *,
        modelless: bool = False,
        bills: Sequence[asyncio.Future[Any]] = (),
    ) -> None:
        """Counts an admitted request's end: ``end``, its answer as read (None: none read);
        ``use``, what its pipeline told of its model calls; ``modelless``, it was served
        another call's answer, or ended while it waited on another call, with no model call of
        its own; ``bills``, the bills to come of its model calls cut without an answer (each
        tells ``charge`` its cost before it is done): the end is counted, and the hold
        released, once they are all done (failed or not), so that no admit meanwhile sees
        neither the hold nor the cost (a request cancelled mid-answer released its hold before
        its bill came: 10 admitted, 43,500,000 nanos spent on a 10,000,000 budget). One that
        used no model tokens (modelless, or ended with no answer made or
        billed before a model call of its own was sent: cancelled, out of time or refused in
        its L1 Lookup, a wait on an identical request's call, its Plan; or with every model
        call it sent refused by its replica before its start) has its reservation back whole
        (``unused``); else its answer is counted (``settle``; the billed one when its end was
        not read), or, with none, its reservation is kept (unless a cut call's bill, told by
        ``charge``, replaced it)."""
        waiting = [bill for bill in bills if not bill.done()]
        if waiting:
            after = asyncio.gather(*waiting, return_exceptions=True)
            after.add_done_callback(lambda _: self.finish(ticket, end, use, modelless=modelless))
            return
        answer = end if end is not None else use.billed
        if modelless or not (answer is not None or use.sent > use.refused):
            self.unused(ticket, release=True)
        else:
            self.settle(ticket, answer, release=True)
        self._count(ticket, 0, 0, release=True)  # its hold, when neither released it

    def unused(self, ticket: Ticket, *, release: bool = False) -> None:
        """Gives an admitted request's reservation back whole, counting no cost: it called no
        model (served another call's answer, billed to that call, or refused before its
        model call), or every model call it sent was refused by its replica before its
        start. Its place in the request rate stays taken, as an L1 hit's does."""
        if ticket.policy.active and ticket.policy.tokens_per_min:
            self._count(ticket, ticket.replace_reservation(), 0, release=release)

    def charge(self, ticket: Ticket, usage: pb.Usage, cost_nanos: int) -> None:
        """Counts a model call billed without an answer (cancelled or cut after its prefill):
        its cost against the budgets, and its tokens against the token rate in place of the
        request's reservation (the first such count replaces it; an answer that comes later,
        from another replica, adds its own tokens). In whichever order they come. A bill kept
        in the outbox comes with no cost: its estimate was counted as it was journalled
        (``count_estimate``)."""
        if not ticket.counted:
            return
        back = ticket.replace_reservation()
        refund = back - model_tokens(usage) if ticket.policy.tokens_per_min else 0
        self._count(ticket, refund, cost_nanos)

    def count_unticketed(
        self, tenant: str, cost_nanos: int, *, started_ms: int | None = None
    ) -> None:
        """Counts the cost of a model call no request of this process admitted: an open call
        of a router killed mid-call, billed at its next start. Its tokens are counted already:
        the killed router's admission reserved the prompt and ``max_tokens``, and nothing gave
        them back. The caller counts it once: on prefix-cache's first reply to its FINAL (a
        replay that finds the FINAL made, ``repeated``, was counted by whoever had that
        reply). In the budget periods it started in (``started_ms``, this clock's; None:
        those of now): a call cut just before midnight UTC is the day's, not the next's."""
        policy = self._policies.for_tenant(tenant)
        if policy.active or self._policies.counts_every_spend():
            self._count(Ticket(tenant, policy, 0), 0, cost_nanos, started_ms)

    def count_estimate(self, tenant: str, estimate_nanos: int, counted_ms: int) -> None:
        """Counts the estimate of a bill the billing outbox journalled (an answer served, or a
        call billed without it, while prefix-cache was down) as its line is written, in the
        budget periods of ``counted_ms`` (journalled with it: where ``reconcile`` corrects it).
        Negative: an estimate counted before is taken back (its call's FINAL was made after
        all, and the entry settled unreplayed) or replaced by a larger or smaller one."""
        policy = self._policies.for_tenant(tenant)
        if policy.active or self._policies.counts_every_spend():
            self._count(Ticket(tenant, policy, 0), 0, estimate_nanos, counted_ms)

    def reconcile(
        self, tenant: str, correction_nanos: int, counted_ms: int, *, inherited: bool = False
    ) -> None:
        """Corrects a cost counted at the router's estimate (an answer served while
        prefix-cache was down) once the billing outbox's replay is billed:
        ``correction_nanos`` (billed minus estimated, either sign) goes to the budgets of the
        day and month it was counted in (``counted_ms``, this clock's), not to those of the
        replay. The caller corrects it once: on prefix-cache's first reply to its FINAL (a
        replay by a router restarted mid-replay finds it ``repeated``). ``inherited``: the
        estimate was counted by an earlier process of this router (the outbox's entry came
        from its journal); a store in this process's memory never counted it, so there is
        nothing to correct (its counts started from none at the restart)."""
        if inherited and not self._store.outlives_process:
            return
        policy = self._policies.for_tenant(tenant)
        if policy.active or self._policies.counts_every_spend():
            self._count(Ticket(tenant, policy, 0), 0, correction_nanos, counted_ms)

    def _count(
        self,
        ticket: Ticket,
        refund: int,
        cost_nanos: int,
        incurred_ms: int | None = None,
        *,
        release: bool = False,
    ) -> None:
        """Tokens back to the rate (negative: taken) and a cost to the budgets, in the
        background (``drain`` awaits it), under an id of its own; nothing when both are 0 and
        nothing is released. ``incurred_ms``: when the cost was incurred, whose budget periods
        it counts in (None: those it is sent in). ``release``: the request ended, its hold on
        the budgets (if not released yet) goes with this count, in the same settle."""
        hold = ticket.take_release() if release else None
        if refund == 0 and cost_nanos == 0 and hold is None:
            return
        now = self._ages.now_ms()
        count = Settle(
            ticket.tenant, ticket.policy, refund, cost_nanos, uuid.uuid4().hex, now, incurred_ms
        )
        count.release = hold
        # a release goes after the counts of its request still on their way (a cut call's cost)
        earlier = [t for t in ticket.counting if not t.done()] if hold is not None else []

        async def first_try() -> None:
            if earlier:
                await asyncio.wait(earlier)
            if hold is not None and ticket.queued:
                # a cost of its request waits for a replay: sent now, the release would let
                # admits see neither the hold nor that cost until the replay (a blip between
                # them: 20 of 20 admitted, 8.7x the budget); the queue replays in order
                self._settles.queue(count)
                return
            try:
                await self._send(count)
            except Exception as exc:
                self._degraded("settle", exc)
                # a release alone too: dropped, its hold refused the tenant until it lapsed (a
                # minute past its request's deadline); released once, however often replayed
                count.failed(exc, now)
                ticket.queued = True
                self._settles.queue(count)

        task = asyncio.create_task(first_try(), name=f"limits-settle-{count.settle_id[:8]}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        ticket.counting[:] = [*(t for t in ticket.counting if not t.done()), task]

    async def _send(self, count: Settle) -> None:
        now = self._clock.now_ms()
        # how long ago its cost was incurred, on this clock (the store's may differ: Redis's)
        age = 0 if count.incurred_ms is None else max(now - count.incurred_ms, 0)
        done = Settlement(
            count.tenant,
            count.policy,
            count.refund,
            count.cost_nanos,
            now,
            Periods.at(now),
            settle_id=count.settle_id,
            age_ms=age,
            release=count.release,
        )
        async with asyncio.timeout(self._timeout_s):
            await self._store.settle(done)

    @property
    def pending(self) -> int:
        """Settles waiting for the store to answer again."""
        return self._settles.count

    async def replay_pending(self) -> None:
        """Sends the pending settles (``PendingSettles.replay_pending``)."""
        await self._settles.replay_pending()

    def _left_alone(self) -> None:
        """An admit not sent (the store failed in a row): a degradation as a timeout is (its
        metric and alert count it so), on the span with why, and no log line of its own."""
        record_event(
            self._tracer,
            "cachemesh.degraded",
            {
                "dependency": "limits",
                "error": "skipped",
                "cachemesh.skipped": "admits failed in a row (ROUTER_REDIS_BREAKER_S)",
            },
        )
        if self._counted is not None:
            self._counted("limits", "DEADLINE_EXCEEDED")

    def _degraded(self, what: str, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            exc = TimeoutError(f"no answer within {self._timeout_s} s")
        self._log_failed(what, exc)
        record_event(
            self._tracer,
            "cachemesh.degraded",
            {"dependency": "limits", "error": type(exc).__name__},
        )
        if self._counted is not None:
            timed_out = isinstance(exc, TimeoutError)
            self._counted("limits", "DEADLINE_EXCEEDED" if timed_out else "UNAVAILABLE")

    def _log_failed(self, what: str, exc: Exception) -> None:
        """The first failure of ``what`` (admit, settle) of its kind logs at once, then one line
        a ``FAILED_LOG_INTERVAL_MS`` saying how many were not logged (each one counted and on
        its span all the same); DEBUG while the breaker has left the store alone (its WARNING
        said what the requests go without meanwhile)."""
        kind = type(exc).__name__
        line = "limits store failed on %s (%s: %s); request admitted%s"
        if self._breaker is not None and self._breaker.tripped:
            log.debug(line, what, kind, exc, "")
        elif due := self._failed_log.due(what, kind):
            log.warning(line, what, kind, exc, suppressed(due, FAILED_LOG_INTERVAL_MS))

    async def drain(self) -> None:
        """Waits for the settles' first tries (not for a store that is down to come back),
        those started while it waits too. Each ends within ``timeout_s``; one still running
        ``TASKS_END_S`` after that (a store call that took its timeout's cancel and went on) is
        cancelled, and abandoned (logged, its settle counted lost) if it goes on: waiting for it
        with no bound held the router's stop forever."""
        abandoned = self._abandoned
        while pending := [t for t in self._background if not t.done() and t not in abandoned]:
            _, late = await asyncio.wait(pending, timeout=self._timeout_s + TASKS_END_S)
            if late:
                left = await cancel_within(list(late), TASKS_END_S, "limits store drain")
                abandoned.update(left)
                if left:
                    self._settles.drop(
                        len(left), "their first try did not end at the stop", force=True
                    )

    async def close(self) -> None:
        await self.drain()
        await self._settles.close()
        await self._store.close()


def read_first(request: pb.CompleteRequest) -> bool:
    """Whether ``request``'s prompt is large enough to have the request rate read before it
    is counted (``READ_FIRST_CHARS``)."""
    return prompt_chars(request) >= READ_FIRST_CHARS


class _StoreFailed(Exception):
    """The store failed (or was silent) on an admit: the request is admitted unlimited."""
