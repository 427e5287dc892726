"""The billing outbox's replay of one entry to prefix-cache (``Replayer.replay``): its commits
sent in order (a FINAL refused for its provider's usage report sent again without it), and what
became of them (``Sent``), under a span in the trace of the request they bill.

Each entry keeps the trace context of the request it bills (its ``traceparent``, journalled
with it: an entry from before it was kept has none); a replay sends an entry's commits under
one span, ``cachemesh.billing_replay``, a child of that request's span, so the Commit calls
join the request's trace even after a restart (an entry with no context is a root span). While
prefix-cache is down each round tries the oldest entry again: only its first unreachable try
is recorded; each next round first asks prefix-cache's health (``prefix_serving``, no span)
and sends the entry only once it says SERVING, recorded: a replay span counting the rounds
before it that found prefix-cache unreachable (``cachemesh.unreachable_rounds``), its Commit
calls (and prefix-cache's) its children. Recorded every time, the tries grew one request's
trace by two spans a ``ROUTER_OUTBOX_RETRY_S`` for as long as the outage lasted; sent
unsampled until one reached prefix-cache (as they still are with no health to ask), the WARM
and FINAL that billed were in no trace, and prefix-cache logged them under a span id no
exported span has. An entry whose tries found prefix-cache unreachable though it said
SERVING (``_RECORDED_UNREACHABLE``) no longer asks: its next tries are sent unsampled (the
trace id still flows, no span is made here or in prefix-cache), and the one that bills is a
replay span made after it.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import Throttles, suppressed
from services.common.errors import Code
from services.router.dependencies import CallFailed, PrefixPort, without_refused_report
from services.router.spans import replay_billed

log = logging.getLogger("cachemesh.router.outbox")

# The request's own fault: retrying cannot succeed. Any other refusal is worth another try,
# and so is a FAILED_PRECONDITION marked ``TABLE_LACKS_MODEL`` (``CallFailed.table_lacks_model``:
# the replica's model table lacks the bill's model, a rolling deploy: a replica with the model
# bills it)
_FINAL = (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION)
# prefix-cache down or not answering: the round stops (no point sending the rest now)
_UNREACHABLE_CODES = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED)
# a replay kept for the next try (prefix-cache refused it for now) logged at most once this
# often for each status code, the first at once: else a line each ROUTER_OUTBOX_RETRY_S (1 s)
# for as long as prefix-cache refuses
KEPT_LOG_EVERY_MS = 10_000
# an entry's tries recorded though they found prefix-cache unreachable: its first, and up to
# three after prefix-cache said it serves (a stale connection to its Redis fails one call):
# past them its tries are sent unsampled, unasked, until one bills
_RECORDED_UNREACHABLE = 4
# the trace context only (traceparent, tracestate): never the caller's baggage, on disk
PROPAGATOR = TraceContextTextMapPropagator()

# asks prefix-cache's health (grpc.health.v1) within the seconds given: True if it says
# SERVING (or has no health to say), False for any other answer or none
PrefixServing = Callable[[float], Awaitable[bool]]
# the layer (``LAYER_PREFIX_CACHE``, ``LAYER_MODEL``) a bill of the model named, reading the
# cached prompt tokens given, is served by (the pipeline's ``served_by``)
BilledLayer = Callable[[str, int], str]


class Sent(enum.Enum):
    """What became of an entry sent to prefix-cache."""

    SETTLED = "settled"  # every commit acknowledged
    DROPPED = "dropped"  # a commit refused for good: settled, billed nothing
    KEPT = "kept"  # refused for now: sent again next round
    UNREACHABLE = "unreachable"  # prefix-cache down: the round stops


@dataclass
class _Unreachable:
    """An entry whose last try found prefix-cache unreachable, and whose first was recorded."""

    rounds: int  # the rounds that found prefix-cache unreachable (sent or not: not SERVING)
    recorded: int  # of those, its tries recorded (the first; then after it said SERVING)


class Replayer:
    """Sends the outbox's entries to prefix-cache, one at a time (``replay``), and remembers
    the entries whose last try found it unreachable (their next tries wait for it to say it
    serves). ``kept_log``: the outbox's throttled log lines; ``pending``: how many entries the
    outbox holds, said when prefix-cache keeps one for the next try."""

    def __init__(
        self,
        prefix: PrefixPort,
        deadline_s: float,
        tracer: trace.Tracer,
        kept_log: Throttles,
        pending: Callable[[], int],
        prefix_serving: PrefixServing | None = None,
        billed_layer: BilledLayer | None = None,
    ) -> None:
        self._prefix = prefix
        self._deadline_s = deadline_s
        self._tracer = tracer
        self._kept_log = kept_log
        self._pending = pending
        self._prefix_serving = prefix_serving
        self._billed_layer = billed_layer
        # entries whose last try found prefix-cache unreachable: their next tries sent only
        # once it says it serves, recorded (``replay``)
        self._unreachable: dict[str, _Unreachable] = {}

    def forget_all_but(self, pending: Iterable[str]) -> None:
        """Forgets the entries no longer pending (billed, dropped, or settled)."""
        for gone in self._unreachable.keys() - set(pending):
            del self._unreachable[gone]

    async def replay(
        self,
        entry_id: str,
        commits: Sequence[pc.CommitRequest],
        carrier: dict[str, str],
        estimate_nanos: int | None = None,
    ) -> tuple[Sent, pc.CommitResponse | None]:
        """One entry's commits under a span in the trace of the request they bill; with the
        last commit's reply when every one was taken, whose bill the span carries (the
        request's own span and access line have only its estimate, ``estimate_nanos``).
        After a recorded try that found prefix-cache unreachable, the next is sent only once
        it says it serves, and recorded (``prefix_serving``); with no one to ask, or once
        ``_RECORDED_UNREACHABLE`` tries were recorded, sent unsampled (``_send_unsampled``)."""
        if not commits:
            return Sent.SETTLED, None
        parent = PROPAGATOR.extract(carrier) if carrier else None
        attributes: dict[str, str | int] = {"cachemesh.commit": commits[0].request_id}
        unreachable = self._unreachable.get(entry_id)
        if unreachable is not None:
            attributes["cachemesh.unreachable_rounds"] = unreachable.rounds
            serving = self._prefix_serving
            if serving is None or unreachable.recorded >= _RECORDED_UNREACHABLE:
                return await self._send_unsampled(
                    entry_id, commits, parent, attributes, unreachable, estimate_nanos
                )
            if not await serving(self._deadline_s):
                unreachable.rounds += 1  # not sent: it says it does not serve, or says nothing
                return Sent.UNREACHABLE, None
        with self._tracer.start_as_current_span(
            "cachemesh.billing_replay", parent, attributes=attributes
        ) as span:
            outcome, reply = await self._send(commits)
            span.set_attribute("cachemesh.outcome", outcome.value)
            self._bill_on(span, commits, reply, estimate_nanos)
        if outcome is not Sent.UNREACHABLE:
            self._unreachable.pop(entry_id, None)
        elif unreachable is None:
            self._unreachable[entry_id] = _Unreachable(1, 1)
        else:
            unreachable.rounds += 1
            unreachable.recorded += 1
        return outcome, reply

    async def _send_unsampled(
        self,
        entry_id: str,
        commits: Sequence[pc.CommitRequest],
        parent: Context | None,
        attributes: dict[str, str | int],
        unreachable: _Unreachable,
        estimate_nanos: int | None,
    ) -> tuple[Sent, pc.CommitResponse | None]:
        """The commits sent unsampled (no span here or in prefix-cache; the trace id still
        reaches its logs); the try that reaches prefix-cache is a replay span made after it,
        starting when it did."""
        started_ns = time.time_ns()
        with trace.use_span(_unsampled(parent), end_on_exit=False):
            outcome, reply = await self._send(commits)
        if outcome is Sent.UNREACHABLE:
            unreachable.rounds += 1
            return outcome, reply
        del self._unreachable[entry_id]
        span = self._tracer.start_span(
            "cachemesh.billing_replay", parent, attributes=attributes, start_time=started_ns
        )
        span.set_attribute("cachemesh.outcome", outcome.value)
        self._bill_on(span, commits, reply, estimate_nanos)
        span.end()
        return outcome, reply

    def _bill_on(
        self,
        span: trace.Span,
        commits: Sequence[pc.CommitRequest],
        reply: pc.CommitResponse | None,
        estimate_nanos: int | None,
    ) -> None:
        """The bill prefix-cache made of a replayed FINAL, on its replay span."""
        if reply is None or not commits or commits[-1].phase != pc.COMMIT_PHASE_FINAL:
            return
        layer = None
        if self._billed_layer is not None:
            layer = self._billed_layer(commits[-1].model, reply.usage.cache_read_input_tokens)
        replay_billed(span, reply, estimate_nanos, layer)

    async def _send(
        self, commits: Sequence[pc.CommitRequest]
    ) -> tuple[Sent, pc.CommitResponse | None]:
        reply = None
        for commit in commits:
            try:
                reply = await self._commit(commit)
            except CallFailed as exc:
                if exc.code in _UNREACHABLE_CODES:
                    return Sent.UNREACHABLE, None
                if exc.table_lacks_model:
                    if due := self._kept_log.due("kept", exc.mark):
                        log.warning(
                            "billing outbox: prefix-cache did not take the %s commit %s (%s: "
                            "%s); %d answers kept for the next try, billed once a replica "
                            "whose model table has the model takes them%s",
                            pc.CommitPhase.Name(commit.phase),
                            commit.request_id,
                            exc.code.name,
                            exc.details,
                            self._pending(),
                            suppressed(due, KEPT_LOG_EVERY_MS),
                        )
                    return Sent.KEPT, None
                if exc.code not in _FINAL:
                    if due := self._kept_log.due("kept", exc.code.name):
                        log.warning(
                            "billing outbox: prefix-cache did not take the %s commit %s (%s); "
                            "%d answers kept for the next try%s",
                            pc.CommitPhase.Name(commit.phase),
                            commit.request_id,
                            exc.code.name,
                            self._pending(),
                            suppressed(due, KEPT_LOG_EVERY_MS),
                        )
                    return Sent.KEPT, None
                log.error(
                    "billing outbox: prefix-cache refused the %s commit %s (%s: %s); dropped",
                    pc.CommitPhase.Name(commit.phase),
                    commit.request_id,
                    exc.code.name,
                    exc.details,
                )
                return Sent.DROPPED, None
        return Sent.SETTLED, reply

    async def _commit(self, commit: pc.CommitRequest) -> pc.CommitResponse:
        """``commit``; a FINAL refused for its provider's report is sent again without it."""
        try:
            return await self._prefix.commit(commit, self._deadline_s)
        except CallFailed as exc:
            again = without_refused_report(commit, exc)
            if again is None:
                raise
        return await self._prefix.commit(again, self._deadline_s)


def _unsampled(parent: Context | None) -> trace.Span:
    """A span recording nothing, nor letting its children record (not sampled), in the trace
    of ``parent`` (its id still reaches prefix-cache's logs; a new one without it)."""
    context = trace.get_current_span(parent).get_span_context() if parent is not None else None
    trace_id = context.trace_id if context is not None and context.is_valid else 0
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id or secrets.randbits(128) or 1,
            secrets.randbits(64) or 1,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
        )
    )
