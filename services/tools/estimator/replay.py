"""Replays log records through an ``OfflineStack`` on its virtual clock, each from its arrival:
records that overlapped in the log (one arrived before an earlier one's logged end) are served
concurrently, each model answer ending at its logged end (``timeline.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from cachemesh.loadtest.reqlog import LogRecord
from cachemesh.loadtest.samples import Sample, from_error, from_response
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelSpec
from services.tools.estimator.offline import OfflineStack
from services.tools.estimator.tenants import stand_ins
from services.tools.estimator.timeline import CURRENT, Timeline, VirtualTime

TtlChoice = Literal["logged", "5m", "1h"]

# How a request ends live that the replay reproduces: its answer, and the refusals of the request
# itself and of its tenant's limits. A record that ended otherwise live (its deadline, a cut, an
# unreachable service: the live stack's moment, not its logic) is replayed until its logged end
# and cut there, as the live router's call was: its lookup and its prefill warm the caches as
# they did, its answer is never stored in L1, its model call (once its prefill was done) is
# billed for what it had produced and counted against the tenant's limits, and it is counted as
# it ended live.
REPLAYED_CODES = frozenset(
    ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
     "OUT_OF_RANGE")
)  # fmt: skip


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
    """Serves each record from its ``t_ms`` (relative to the clock's start); its model answer
    ends at ``t_ms + latency_ms``, its first token at ``t_ms + ttft_ms`` when logged (else at
    the simulator's prefill share of that time). A record without ``latency_ms`` ends as it
    starts. A record that reaches the model in a what-if but was not a model answer live (an
    L1 hit then) has no logged model time: its answer ends at its logged end all the same.
    A tenant the caches would refuse is served under its stand-in (``tenants.stand_ins``)."""
    logged = list(records)
    names = stand_ins(r.item.tenant for r in logged)
    time = VirtualTime(stack.clock)
    start = stack.clock.now_ms()
    samples: list[Sample | None] = [None] * len(logged)

    async def serve(i: int, record: LogRecord) -> None:
        at = start + round(record.t_ms)
        end = at + round(record.latency_ms) if record.latency_ms is not None else at
        first = at + round(record.ttft_ms) if record.ttft_ms is not None else None
        CURRENT.set(Timeline(time, at, end, first))
        tenant = names.get(record.item.tenant, record.item.tenant)
        samples[i] = await _serve(stack, i, record, tenant, what_if, time, end)

    arrivals = [(start + round(r.t_ms), partial(serve, i, r)) for i, r in enumerate(logged)]
    await time.run(arrivals)
    return [s for s in samples if s is not None]


async def _serve(
    stack: OfflineStack,
    i: int,
    record: LogRecord,
    tenant: str,
    what_if: WhatIf,
    time: VirtualTime,
    end_ms: int,
) -> Sample:
    request = what_if.apply(record.item.request)
    if not request.request_id:
        request.request_id = f"replay-{i}"
    at = record.t_ms / 1000
    if record.code is not None and record.code not in REPLAYED_CODES:
        await _cut(stack, tenant, request, time, end_ms)
        return from_error(record.item, record.code, at, 0.0, warmup=record.warmup)
    outcome = await stack.complete(tenant, request)
    if outcome.response is None:
        return from_error(record.item, outcome.code, at, 0.0, warmup=record.warmup)
    logged = stack.table.get(record.item.request.model)
    if request.model != record.item.request.model and logged is not None:
        _priced_against(outcome.response, logged)
    return from_response(record.item, outcome.response, at, 0.0, warmup=record.warmup)


async def _cut(
    stack: OfflineStack, tenant: str, request: pb.CompleteRequest, time: VirtualTime, end_ms: int
) -> None:
    """Serves a request that failed live until its logged end, then cancels it, as the live
    router's call ended then (its deadline, a cut, the caller gone): the pipeline's own
    cancel path runs, so nothing is stored in L1, a lease it held is released, and a model call
    past its prefill is billed for what it had produced by then (its prompt: the held answer's
    tokens are handed over only at the logged end) and charged to the tenant's limits. A
    request that failed before its model call's prefill (or with no logged end) is billed
    nothing: one cut before its model call was sent (while it waited on an identical request's
    call) gives its reservation back whole, one cut after that keeps it, by the Gateway's own
    rule (``Limiter.finish``), as live. A request the replay answers before then (an L1 hit in
    a what-if) is counted as it was answered."""
    served = asyncio.ensure_future(stack.complete(tenant, request))
    await time.until(end_ms)  # parked first: released before the answer held until then
    served.cancel()
    await asyncio.gather(served, return_exceptions=True)
    await stack.settled()  # the cut call's bill, and its count against the limits


def log_timing(records: Sequence[LogRecord]) -> dict[str, int]:
    """How many records have no logged end (replayed as taking no time), and how many arrived
    before an earlier record's logged end (replayed concurrently with it)."""
    without_end = sum(1 for r in records if r.latency_ms is None)
    overlapping, latest_end = 0, float("-inf")
    for record in records:
        overlapping += record.t_ms < latest_end
        end = record.t_ms + (0.0 if record.latency_ms is None else record.latency_ms)
        latest_end = max(latest_end, end)
    return {"records": len(records), "without_end": without_end, "overlapping": overlapping}


def _priced_against(response: pb.CompleteResponse, logged: ModelSpec) -> None:
    """The what-if's saving measured against the logged request's own model: ``auto`` prices
    its baseline at the largest tier, which would count the routing's choice of a smaller
    model as a saving even when the logged traffic asked for that model already."""
    usage = response.usage
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    baseline = logged.baseline_nanos(prompt, usage.output_tokens)
    response.cost.baseline_nanos = baseline
    response.cost.saved_nanos = baseline - response.cost.cost_nanos
