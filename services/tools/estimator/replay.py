"""Replays log records one at a time through an ``OfflineStack`` on its virtual clock."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cachemesh.loadtest.reqlog import LogRecord
from cachemesh.loadtest.samples import Sample, from_error, from_response
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelSpec
from services.tools.estimator.offline import OfflineStack

TtlChoice = Literal["logged", "5m", "1h"]


@dataclass(frozen=True)
class WhatIf:
    """Changes applied to each logged request before it is replayed."""

    l1: bool = True  # False: every request bypasses the semantic cache
    l2_ttl: TtlChoice = "logged"  # rewrite every cache_control breakpoint's TTL
    routing: Literal["logged", "auto"] = "logged"  # auto: let the router pick the tier

    def apply(self, request: pb.CompleteRequest) -> pb.CompleteRequest:
        out = pb.CompleteRequest()
        out.CopyFrom(request)
        if not self.l1:
            out.cache.semantic = pb.SEMANTIC_MODE_BYPASS
        if self.routing == "auto":
            out.model = "auto"
        if self.l2_ttl != "logged":
            ttl = pb.CACHE_TTL_1H if self.l2_ttl == "1h" else pb.CACHE_TTL_5M
            marks = [t.cache_control for t in out.tools if t.HasField("cache_control")]
            marks += [b.cache_control for b in out.system if b.HasField("cache_control")]
            marks += [
                b.cache_control
                for m in out.messages
                for b in m.content
                if b.HasField("cache_control")
            ]
            for mark in marks:
                mark.ttl = ttl
        return out


async def replay(
    stack: OfflineStack, records: Iterable[LogRecord], what_if: WhatIf = WhatIf()
) -> list[Sample]:
    """Moves the clock to each record's ``t_ms`` (relative to the clock's start), then serves it."""
    start = stack.clock.now_ms()
    samples: list[Sample] = []
    for i, record in enumerate(records):
        target = start + round(record.t_ms)
        stack.clock.advance(ms=max(0, target - stack.clock.now_ms()))
        request = what_if.apply(record.item.request)
        if not request.request_id:
            request.request_id = f"replay-{i}"
        outcome = await stack.complete(record.item.tenant, request)
        at = record.t_ms / 1000
        if outcome.response is None:
            samples.append(from_error(record.item, outcome.code, at, 0.0))
            continue
        logged = stack.table.get(record.item.request.model)
        if request.model != record.item.request.model and logged is not None:
            _priced_against(outcome.response, logged)
        samples.append(from_response(record.item, outcome.response, at, 0.0))
    return samples


def _priced_against(response: pb.CompleteResponse, logged: ModelSpec) -> None:
    """The what-if's saving measured against the logged request's own model: ``auto`` prices
    its baseline at the largest tier, which would count the routing's choice of a smaller
    model as a saving even when the logged traffic asked for that model already."""
    usage = response.usage
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    baseline = logged.baseline_nanos(prompt, usage.output_tokens)
    response.cost.baseline_nanos = baseline
    response.cost.saved_nanos = baseline - response.cost.cost_nanos
