"""One access-log line per Gateway request, and its metrics, written when the call ends.

The line (logger ``cachemesh.access``, INFO) is JSON like every line (``services.common.logs``)
and carries the request's trace id; its fields: tenant, request_id, method, the model asked
and the one that answered, tier, served_by, status (the gRPC code), the four token counts,
cost, baseline and saved in nano-dollars, whether the cost is an estimate, and the duration;
a DEADLINE_EXCEEDED line says whose deadline it was (``deadline``: ``client``, or ``router``
for ROUTER_MODEL_TIMEOUT_S). An ``auto`` answer whose tier the router chose carries the
decision (``routing_score``, ``routing_threshold``, ``routing_embedding_source`` and
``routing_reason``, which names a fallback to another tier and why): before, the line said
which tier answered and not why, a fallback billed at the large tier's price looking like
the score's choice.
A model call billed without its answer (the caller cancelled, or its replica was cut before
another answered) is on the line as ``unanswered_cost_nanos``; a call that ended with no answer
carries those calls' bills as its usage and cost. Such a line is written once the bills are
known (prefix-cache's FINAL, or the outbox's estimate), after the call's end; so is the line of
an answer that went at the router's estimate before its FINAL answered (``billing.LateBill``),
with that FINAL's bill, which its metrics count too.
Never the prompt, the answer or the key. A requested model the table does not know is written
as ``?`` (it is the caller's free text). The ``request_id`` is whole (an accepted one has at
most ``MAX_ID_CHARS``; a longer one, refused, keeps that many). A request refused before the
servicer because it did not parse has its line too (``INVALID_ARGUMENT``, no tenant, no
trace: ``refused``); one over ``ROUTER_MAX_REQUEST_BYTES`` is ``RESOURCE_EXHAUSTED`` with its
tenant; only one over twice it has none (gRPC refuses it before any code of the router runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _escape

from cachemesh.v1 import gateway_pb2 as pb
from services.common.logs import JsonLines, json_string
from services.common.models import AUTO, ModelTable
from services.router.billing import Bill, Bills
from services.router.metrics import LAYERS, RouterMetrics, deadline_label
from services.router.validation import MAX_ID_CHARS

access = logging.getLogger("cachemesh.access")


@dataclass
class Call:
    """What a Gateway call's handler learns as it goes."""

    method: str  # Complete | StreamComplete
    began: float
    tenant: str = ""
    end: pb.CompleteResponse | None = None
    replayed: bool = False
    bills: Bills = field(default_factory=list)  # its model calls billed without an answer
    # it failed DEADLINE_EXCEEDED at the router's ROUTER_MODEL_TIMEOUT_S, not the caller's
    # deadline (``model_answer.DeadlineCut``): the server's fault
    routers_deadline: bool = False
    # its answer went at the router's estimate before its FINAL answered: the end as billed,
    # to come (``billing.LateBill``); its metrics and line wait for it
    late: asyncio.Future[pb.CompleteResponse] | None = None
    # that bill, for which the call's span waits (``rpc_tracing.end_after``) to carry it
    late_bills: list[asyncio.Future[pb.CompleteResponse]] = field(default_factory=list)

    def late_bill(self, billed: asyncio.Future[pb.CompleteResponse]) -> None:
        self.late = billed
        self.late_bills.append(billed)


class RequestLog:
    def __init__(
        self,
        metrics: RouterMetrics,
        table: ModelTable,
        clock: Callable[[], float],
        lines: JsonLines | None = None,
    ) -> None:
        """``lines``: the direct writer of JSON lines (``configure_logging``'s); None = through
        the logging module (the text format, tests)."""
        self._metrics = metrics
        self._table = table
        self.clock = clock
        self._lines = lines

    def begin(self, method: str) -> Call:
        self._metrics.in_flight.inc()
        return Call(method, self.clock())

    def refused(self, method: str, code: str) -> None:
        """A call refused before its handler ran (a request that did not parse): counted as a
        failure of no tenant (its key was never read), its line without a request's fields."""
        self.finish(self.begin(method), pb.CompleteRequest(), code)

    def finish(self, call: Call, request: pb.CompleteRequest, code: str) -> None:
        self._metrics.in_flight.dec()
        seconds = self.clock() - call.began
        late = call.late
        if late is not None and not late.done():  # counted as billed, once it is
            late.add_done_callback(lambda _: self._finished(call, request, code, seconds))
            return
        self._finished(call, request, code, seconds)

    def _finished(self, call: Call, request: pb.CompleteRequest, code: str, seconds: float) -> None:
        if call.end is not None and (billed := billed_late(call.late)) is not None:
            call.end = billed
        end = call.end
        if code != "OK" or end is None:
            self._metrics.failed(call.tenant, code, seconds, routers_deadline=call.routers_deadline)
            if end is not None and not call.replayed:
                # billed in full, but the caller left before it reached it: still its money
                self._metrics.unreceived(call.tenant, end)
        elif call.replayed:
            self._metrics.replayed(call.tenant)
        else:
            self._metrics.answered(call.tenant, end, seconds)
        if not access.isEnabledFor(logging.INFO):
            return
        if all(bill.done() for bill in call.bills):
            self._write(call, request, code, seconds)
            return
        waited = asyncio.gather(*call.bills, return_exceptions=True)
        waited.add_done_callback(lambda _: self._write(call, request, code, seconds))

    def _write(self, call: Call, request: pb.CompleteRequest, code: str, seconds: float) -> None:
        end = call.end
        asked = request.model
        if asked != AUTO and self._table.get(asked) is None:
            asked = "?"
        members = (
            f',"tenant":{_escape(call.tenant)},"request_id":{json_string(request.request_id[:MAX_ID_CHARS])},'
            f'"method":"{call.method}","requested_model":{_escape(asked)},"status":"{code}",'
            f'"duration_ms":{round(seconds * 1000, 3)!r}'
        )
        if code == "DEADLINE_EXCEEDED":  # whose deadline cut it
            members += f',"deadline":"{deadline_label(code, call.routers_deadline)}"'
        billed = _billed(call.bills)
        if billed is not None:
            members += f',"unanswered_cost_nanos":{billed.cost.cost_nanos}'
        if end is None and billed is not None:
            usage, cost = billed.usage, billed.cost
            members += _money(usage, cost)
        if end is not None:
            usage, cost = end.usage, end.cost
            members += (
                f',"model":{_escape(end.model)},"tier":{_escape(end.tier)},'
                f'"served_by":"{LAYERS.get(end.served_by, "none")}",'
                f'"replayed":{"true" if call.replayed else "false"}'
            ) + _money(usage, cost)
            if end.HasField("routing"):  # ``auto``'s tier, chosen by the router: why
                routing = end.routing
                members += (
                    f',"routing_score":{round(routing.score, 4)!r},'
                    f'"routing_threshold":{round(routing.threshold, 4)!r},'
                    f'"routing_embedding_source":{_escape(routing.embedding_source)},'
                    f'"routing_reason":{_escape(routing.reason)}'
                )
        if self._lines is not None:
            self._lines.write(access.name, "access", members)
        else:  # the text format: the same fields, through the logging module
            access.info("access", extra={"fields": json.loads("{" + members[1:] + "}")})


def billed_late(
    late: asyncio.Future[pb.CompleteResponse] | None,
) -> pb.CompleteResponse | None:
    """An answer's end as billed after it went (None: none came, or it was cancelled)."""
    if late is None or not late.done() or late.cancelled() or late.exception() is not None:
        return None
    return late.result()


def _money(usage: pb.Usage, cost: pb.Cost) -> str:
    return (
        f',"input_tokens":{usage.input_tokens},'
        f'"cache_creation_input_tokens":{usage.cache_creation_input_tokens},'
        f'"cache_read_input_tokens":{usage.cache_read_input_tokens},'
        f'"output_tokens":{usage.output_tokens},"cost_nanos":{cost.cost_nanos},'
        f'"baseline_nanos":{cost.baseline_nanos},"saved_nanos":{cost.saved_nanos},'
        f'"cost_estimated":{"true" if cost.estimated else "false"}'
    )


def _billed(bills: Bills) -> Bill | None:
    """The sum of the bills that came (one that failed or was cancelled is not known)."""
    known = [
        bill.result()
        for bill in bills
        if bill.done() and not bill.cancelled() and bill.exception() is None
    ]
    came = [bill for bill in known if bill is not None]
    if not came:
        return None
    usage, cost = pb.Usage(), pb.Cost()
    for bill in came:
        usage.input_tokens += bill.usage.input_tokens
        usage.cache_creation_input_tokens += bill.usage.cache_creation_input_tokens
        usage.cache_read_input_tokens += bill.usage.cache_read_input_tokens
        usage.output_tokens += bill.usage.output_tokens
        cost.cost_nanos += bill.cost.cost_nanos
        cost.baseline_nanos += bill.cost.baseline_nanos
        cost.saved_nanos += bill.cost.saved_nanos
        cost.estimated |= bill.cost.estimated
    return Bill(usage, cost)
