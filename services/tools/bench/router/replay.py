"""One routing policy replayed over one workload in the offline stack, request by request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    measured), on a fresh stack whose clock follows the records' times."""
    stack = OfflineStack(
        settings,
        ManualClock(),
        embedder=shared.embedder,
        tokenizer=shared.tokenizer,
        cross_encoder=shared.cross_encoder,
    )
    start = stack.clock.now_ms()
    out: list[Served] = []
    for i, record in enumerate(logged):
        stack.clock.advance(ms=max(0, start + round(record.t_ms) - stack.clock.now_ms()))
        request = pb.CompleteRequest()
        request.CopyFrom(record.item.request)
        request.model = model
        request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
        request.request_id = request.request_id or f"router-replay-{i}"
        outcome = await stack.complete(record.item.tenant, request)
        response = outcome.response
        if response is None:
            out.append(Served("", None, 0))
            continue
        routed = response.HasField("routing")
        out.append(
            Served(
                response.tier,
                response.routing.score if routed else None,
                response.cost.cost_nanos,
            )
        )
    return out
