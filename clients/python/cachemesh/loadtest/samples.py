"""One measured request, as a small picklable record (what every process sends back)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cachemesh._requests import answer_text
from cachemesh.loadtest.workloads import Item, normalise
from cachemesh.v1 import gateway_pb2 as pb

LAYERS = {
    pb.LAYER_SEMANTIC_CACHE: "semantic_cache",
    pb.LAYER_PREFIX_CACHE: "prefix_cache",
    pb.LAYER_MODEL: "model",
}
ERROR = "error"
# the code of a request still running at the end of the run's grace (after its deadline): the
# run's own cut, counted apart from the errors
CUT = "CUT_AT_DEADLINE"
# the code of each planned request of a client process that died (or hung) before it reported
# its samples: whether it was sent, and how it ended, is unknown (it has no time either)
LOST = "CLIENT_PROCESS_LOST"
# the code of a request still running when the run was interrupted (Ctrl-C)
INTERRUPTED = "INTERRUPTED"


@dataclass(frozen=True)
class Sample:
    kind: str
    layer: str  # semantic_cache | prefix_cache | model | error
    code: str  # OK or the gRPC status name
    started_s: float  # time.monotonic() when the request was due (offsets, not a date)
    latency_s: float
    ttft_s: float | None  # streaming only: until the first content delta
    exact: bool = False
    similarity: float = 0.0
    model: str = ""
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    kv_cached_tokens: int = 0
    cost_nanos: int = 0
    baseline_nanos: int = 0
    estimated: bool = False
    question: str = ""  # normalised asked text (labelled workloads only)
    answer_digest: str = ""  # of the answer text (labelled workloads only)
    warmup: bool = False
    index: int = -1  # the request's place in its plan (the warm-up's or the measured one)

    @property
    def ok(self) -> bool:
        return self.layer != ERROR


def answer_digest(response: pb.CompleteResponse) -> str:
    return hashlib.sha256(answer_text(response).encode()).hexdigest()[:16]


def from_response(
    item: Item,
    response: pb.CompleteResponse,
    started_s: float,
    latency_s: float,
    ttft_s: float | None = None,
    *,
    warmup: bool = False,
    index: int = -1,
) -> Sample:
    usage, cost = response.usage, response.cost
    labelled = bool(item.question)
    return Sample(
        kind=item.kind,
        layer=LAYERS.get(response.served_by, "unspecified"),
        code="OK",
        started_s=started_s,
        latency_s=latency_s,
        ttft_s=ttft_s,
        exact=response.semantic.exact,
        similarity=response.semantic.similarity,
        model=response.model,
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_input_tokens,
        cache_write_tokens=usage.cache_creation_input_tokens,
        output_tokens=usage.output_tokens,
        kv_cached_tokens=usage.kv_cached_tokens,
        cost_nanos=cost.cost_nanos,
        baseline_nanos=cost.baseline_nanos,
        estimated=cost.estimated,
        question=normalise(item.question) if labelled else "",
        answer_digest=answer_digest(response) if labelled else "",
        warmup=warmup,
        index=index,
    )


def from_error(
    item: Item,
    code: str,
    started_s: float,
    latency_s: float,
    *,
    warmup: bool = False,
    index: int = -1,
) -> Sample:
    return Sample(item.kind, ERROR, code, started_s, latency_s, None, warmup=warmup, index=index)
