"""One access-log line per Gateway request, and its metrics, written when the call ends.

The line (logger ``cachemesh.access``, INFO) is JSON like every line (``services.common.logs``)
and carries the request's trace id; its fields: tenant, request_id, method, the model asked
and the one that answered, tier, served_by, status (the gRPC code), the four token counts,
cost, baseline and saved in nano-dollars, whether the cost is an estimate, and the duration.
Never the prompt, the answer or the key. A requested model the table does not know is written
as ``?`` (it is the caller's free text).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring as _escape

from cachemesh.v1 import gateway_pb2 as pb
from services.common.logs import JsonLines
from services.common.models import AUTO, ModelTable
from services.router.metrics import LAYERS, RouterMetrics

access = logging.getLogger("cachemesh.access")


@dataclass
class Call:
    """What a Gateway call's handler learns as it goes."""

    method: str  # Complete | StreamComplete
    began: float
    tenant: str = ""
    end: pb.CompleteResponse | None = None
    replayed: bool = False


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

    def finish(self, call: Call, request: pb.CompleteRequest, code: str) -> None:
        self._metrics.in_flight.dec()
        seconds = self.clock() - call.began
        end = call.end
        if code != "OK" or end is None:
            self._metrics.failed(call.tenant, code, seconds)
        elif call.replayed:
            self._metrics.replayed(call.tenant)
        else:
            self._metrics.answered(call.tenant, end, seconds)
        if not access.isEnabledFor(logging.INFO):
            return
        asked = request.model
        if asked != AUTO and self._table.get(asked) is None:
            asked = "?"
        members = (
            f',"tenant":{_escape(call.tenant)},"request_id":{_escape(request.request_id[:64])},'
            f'"method":"{call.method}","requested_model":{_escape(asked)},"status":"{code}",'
            f'"duration_ms":{round(seconds * 1000, 3)!r}'
        )
        if end is not None:
            usage, cost = end.usage, end.cost
            members += (
                f',"model":{_escape(end.model)},"tier":{_escape(end.tier)},'
                f'"served_by":"{LAYERS.get(end.served_by, "none")}",'
                f'"replayed":{"true" if call.replayed else "false"},'
                f'"input_tokens":{usage.input_tokens},'
                f'"cache_creation_input_tokens":{usage.cache_creation_input_tokens},'
                f'"cache_read_input_tokens":{usage.cache_read_input_tokens},'
                f'"output_tokens":{usage.output_tokens},"cost_nanos":{cost.cost_nanos},'
                f'"baseline_nanos":{cost.baseline_nanos},"saved_nanos":{cost.saved_nanos},'
                f'"cost_estimated":{"true" if cost.estimated else "false"}'
            )
        if self._lines is not None:
            self._lines.write(access.name, "access", members)
        else:  # the text format: the same fields, through the logging module
            access.info("access", extra={"fields": json.loads("{" + members[1:] + "}")})
