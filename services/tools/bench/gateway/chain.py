"""The shapes of the bench's gRPC echo references: who calls whom, with how many bytes.

A ``Chain`` is what a front process (the router's place) does for each client call: its steps
in order, the calls of one step in parallel, each to an echo process standing for a service.
``two_hop`` is the bare floor (client → hop → hop); ``miss_chain`` is an L1 miss as the router
makes it: Lookup, Plan, Generate (server streaming; Commit WARM at its first message), then
Commit FINAL and Store in parallel, with the byte sizes of the real messages for the given
requests (the median one), so a miss is divided by a reference of its own shape: a Lookup
for ``auto`` returns the question's embedding (float32), the Plan's reply carries the
prompt's facts (its KV block hashes, 2 bytes a token), the Generate call carries them on
beside the request, and the WARM commit names the Plan instead of carrying the request (as
``services.router.calls.warm_commit`` sends it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, prefix_cache_pb2, semantic_cache_pb2
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.kv_blocks import BLOCK_SIZE
from services.common.models import AUTO
from services.semantic_cache.embedder import DIM, MODEL_ID, MODEL_SHA256

# What the messages around a miss carry besides the request (representative values: only
# their encoded sizes matter). The simulator's answers end after 20 to 120 tokens.
ANSWER_TOKENS = 70
DELTA_TOKENS = 4  # tokens per streamed GenerateChunk (the engine's default)
CHARS_PER_TOKEN = 4
_TENANT = "tenant-a"
_MODEL = "sim-large"
_REPLICAS = ("127.0.0.1:50054", "127.0.0.1:50055")
_HEX32 = "0" * 32
BLOCK_HASH_BYTES = 32  # a KV block's chained sha256 (prompt.proto's PromptFacts)
PLANNED_AT_MS = 1_765_000_000_000  # a Plan's time, as an epoch millisecond of these years
LEASE_S = 30.0  # a leading Lookup's lease (SEMANTIC_CACHE_LEASE_S)


@dataclass(frozen=True)
class Call:
    service: str  # the echo process that answers it (one process per service)
    method: str
    request_bytes: int
    reply_bytes: int  # of each reply message
    replies: int = 1  # more than 1: a server stream of that many messages
    during: tuple[Call, ...] = ()  # made after the stream's first message, before the rest

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service, "method": self.method,
            "request_bytes": self.request_bytes, "reply_bytes": self.reply_bytes,
            "replies": self.replies,
        }  # fmt: skip
        if self.during:
            out["during"] = [c.describe() for c in self.during]
        return out


@dataclass(frozen=True)
class Chain:
    name: str
    request_bytes: int  # client → front
    reply_bytes: int  # front → client
    steps: tuple[tuple[Call, ...], ...]

    def calls(self) -> list[Call]:
        """Every call a client call causes, ``during`` ones included."""
        out: list[Call] = []
        pending = [c for step in self.steps for c in step]
        while pending:
            call = pending.pop(0)
            out.append(call)
            pending[:0] = call.during
        return out

    def services(self) -> list[str]:
        return list(dict.fromkeys(c.service for c in self.calls()))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "request_bytes": self.request_bytes,
            "reply_bytes": self.reply_bytes,
            "downstream_calls": len(self.calls()),
            "steps": [[c.describe() for c in step] for step in self.steps],
        }


def two_hop(payload_bytes: int) -> Chain:
    """Client → hop 1 → hop 2 and back, the same payload each way."""
    echo = Call("hop-2", "Echo", payload_bytes, payload_bytes)
    return Chain("two_hops", payload_bytes, payload_bytes, ((echo,),))


def median_request(requests: Sequence[pb.CompleteRequest]) -> pb.CompleteRequest:
    if not requests:
        raise ValueError("a miss chain needs at least one request to take its sizes from")
    sizes = [r.ByteSize() for r in requests]
    middle = statistics.median_low(sizes)
    return requests[sizes.index(middle)]


def miss_chain(name: str, requests: Sequence[pb.CompleteRequest]) -> Chain:
    """The router's six calls for an L1 miss of the median-sized request of ``requests``."""
    request = median_request(requests)
    tokens = max(1, request.ByteSize() // CHARS_PER_TOKEN)
    answer = [pb.ContentBlock(text="x" * (ANSWER_TOKENS * CHARS_PER_TOKEN))]
    usage = pb.Usage(input_tokens=tokens // 10, cache_read_input_tokens=tokens - tokens // 10,
                     output_tokens=ANSWER_TOKENS, kv_cached_tokens=tokens)  # fmt: skip
    cost = pb.Cost(cost_nanos=4_000_000, baseline_nanos=16_000_000, saved_nanos=12_000_000)
    commit_id = _HEX32 + "#" + "0" * 16
    plan_id = "0" * 24  # PlanMemo's: 12 random bytes in hex
    hashes = bytes(BLOCK_HASH_BYTES * (tokens // BLOCK_SIZE))
    facts = PromptFacts(prompt_tokens=tokens, kv_block_hashes=hashes, digest="0" * 64)

    # ``auto`` (the bench's miss cases): the router wants the question's embedding for its
    # tier choice, which a miss's Lookup returns
    auto = request.model == AUTO
    embedding = bytes(4 * DIM) if auto else b""
    version = f"{MODEL_ID}@{MODEL_SHA256[:12]}" if auto else ""
    lookup = Call(
        "semantic-cache", "Lookup",
        semantic_cache_pb2.LookupRequest(tenant=_TENANT, request=request,
                                         want_embedding=auto).ByteSize(),
        semantic_cache_pb2.LookupResponse(
            leader=True, lease_id=_HEX32, best_similarity=0.61, lease_s=LEASE_S,
            embedding=embedding, embedder_version=version).ByteSize(),
    )  # fmt: skip
    plan = Call(
        "prefix-cache", "Plan",
        prefix_cache_pb2.PlanRequest(tenant=_TENANT, model=_MODEL, request=request,
                                     replicas=list(_REPLICAS)).ByteSize(),
        prefix_cache_pb2.PlanResponse(
            plan_id=plan_id, prompt=facts, usage=usage, prompt_tokens=tokens,
            planned_at_ms=PLANNED_AT_MS, candidates=[
                prefix_cache_pb2.ReplicaCandidate(replica=r, warm_prefix_tokens=tokens)
                for r in _REPLICAS]).ByteSize(),
    )  # fmt: skip
    warm = Call(
        "prefix-cache", "CommitWarm",
        prefix_cache_pb2.CommitRequest(
            tenant=_TENANT, request_id=commit_id, phase=prefix_cache_pb2.COMMIT_PHASE_WARM,
            model=_MODEL, replica=_REPLICAS[0], kv_cached_tokens=tokens, plan_id=plan_id,
            max_read_tokens=tokens).ByteSize(),
        prefix_cache_pb2.CommitResponse(usage=usage).ByteSize(),
    )  # fmt: skip
    generate = Call(
        "model", "Generate",
        model_pb2.GenerateRequest(
            tenant=_TENANT, model=_MODEL, request=request, prompt=facts).ByteSize(),
        model_pb2.GenerateChunk(text="x" * (DELTA_TOKENS * CHARS_PER_TOKEN)).ByteSize(),
        replies=2 + math.ceil(ANSWER_TOKENS / DELTA_TOKENS),  # start, the deltas, end
        during=(warm,),
    )  # fmt: skip
    final = Call(
        "prefix-cache", "CommitFinal",
        prefix_cache_pb2.CommitRequest(
            tenant=_TENANT, request_id=commit_id, phase=prefix_cache_pb2.COMMIT_PHASE_FINAL,
            model=_MODEL, replica=_REPLICAS[0], output_tokens=ANSWER_TOKENS,
            kv_cached_tokens=tokens, baseline_model=_MODEL).ByteSize(),
        prefix_cache_pb2.CommitResponse(usage=usage, cost=cost, estimated_usage=usage).ByteSize(),
    )  # fmt: skip
    store = Call(
        "semantic-cache", "Store",
        semantic_cache_pb2.StoreRequest(tenant=_TENANT, request=request, answer=(
            semantic_cache_pb2.CachedAnswer(content=answer, model=_MODEL, tier="large",
                                            stop_reason="end_turn",
                                            output_tokens=ANSWER_TOKENS))).ByteSize(),
        semantic_cache_pb2.StoreResponse(stored=True, entry_id=_HEX32).ByteSize(),
    )  # fmt: skip
    reply = pb.CompleteResponse(
        content=answer, served_by=pb.LAYER_PREFIX_CACHE, model=_MODEL, tier="large",
        stop_reason="end_turn", usage=usage, cost=cost, trace_id=_HEX32,
    )  # fmt: skip
    steps = ((lookup,), (plan,), (generate,), (final, store))
    return Chain(name, request.ByteSize(), reply.ByteSize(), steps)
