"""One routing policy replayed over one workload in the offline stack, request by request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cachemesh.loadtest.reqlog import LogRecord
from cachemesh.loadtest.workloads import WorkloadSpec, build
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.tokens import Tokenizer
from services.semantic_cache.cross_encoder import PairScorer
from services.semantic_cache.embedder import Embedder
from services.tools.bench.router.frontier import Served
from services.tools.estimator.offline import OfflineStack
from services.tools.estimator.timeline import CURRENT, Timeline, VirtualTime


@dataclass(frozen=True)
class Shared:
    """What every replay may share: the embedder, the tokenizer and L1's cross-encoder (each
    loaded once, not once a stack: 30 stacks in the default run)."""

    embedder: Embedder
    tokenizer: Tokenizer
    cross_encoder: PairScorer


def records(workload: str, requests: int, interval_ms: int, data: Path) -> list[LogRecord]:
    """The same requests for every policy: the workload's seeded stream at fixed intervals."""
    source = build(WorkloadSpec(workload, 7, "router-replay", data))
    return [LogRecord(i * interval_ms, source.next_item()) for i in range(requests)]


async def run(
    settings: Mapping[str, str], logged: list[LogRecord], model: str, shared: Shared
) -> list[Served]:
    """Each request as ``model`` ("auto" or a model id), L1 bypassed (the router alone is
    measured), on a fresh stack on the estimator's virtual time (``VirtualTime``), each from
    its record's time, its answer taking none (the records have no ends: one request at a
    time), as the estimator replays a log without ends. On that time no real-time bound cuts a
    Lookup: the embedding ``auto`` is scored on is always made (``LocalSemantic``), as live on
    an idle machine. Replayed on the manual clock alone (no timeline), a Lookup kept the
    router's real-time ``ROUTER_SEMANTIC_TIMEOUT_S``, and one that missed it on a loaded machine
    was scored on the request's shape alone: a figure that moved with the machine's load."""
    stack = OfflineStack(
        settings,
        ManualClock(),
        embedder=shared.embedder,
        tokenizer=shared.tokenizer,
        cross_encoder=shared.cross_encoder,
    )
    time = VirtualTime(stack.clock)
    start = stack.clock.now_ms()
    out: list[Served | None] = [None] * len(logged)

    async def serve(i: int, record: LogRecord) -> None:
        at = start + round(record.t_ms)
        CURRENT.set(Timeline(time, at, at, None))  # no logged end: it takes no time
        out[i] = await _served(stack, i, record, model)

    await time.run([(start + round(r.t_ms), partial(serve, i, r)) for i, r in enumerate(logged)])
    served = [s for s in out if s is not None]
    if len(served) != len(logged):  # time.run awaits each request, raising a failed one's error
        raise RuntimeError(f"the replay ended with {len(logged) - len(served)} request(s) unserved")
    return served


async def _served(stack: OfflineStack, i: int, record: LogRecord, model: str) -> Served:
    request = pb.CompleteRequest()
    request.CopyFrom(record.item.request)
    request.model = model
    request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
    request.request_id = request.request_id or f"router-replay-{i}"
    outcome = await stack.complete(record.item.tenant, request)
    response = outcome.response
    if response is None:
        return Served("", None, 0)
    routed = response.HasField("routing")
    return Served(
        response.tier,
        response.routing.score if routed else None,
        response.cost.cost_nanos,
    )
