"""The learned router through the running stack: its score, threshold and reason on the
response and the root span; a request's own threshold changing the tier; a conversation whose
long prefix is warm on the large model kept there, with the reason given."""

from __future__ import annotations

import time
import uuid

import pytest

from cachemesh import Client
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.stack.otlp_sink import Span
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

MATH = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


def _ask(
    question: str,
    *,
    threshold: float | None = None,
    semantic: pb.SemanticMode.ValueType = pb.SEMANTIC_MODE_BYPASS,
    system: str = "",
    history: tuple[pb.Message, ...] = (),
) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model="auto",
        max_tokens=16,
        messages=[
            *history,
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)]),
        ],
        cache=pb.CacheOptions(semantic=semantic),
    )
    if system:  # a breakpoint on it: the prefix the providers cache
        request.system.append(pb.ContentBlock(text=system, cache_control=pb.CacheControl()))
    if threshold is not None:
        request.routing.threshold = threshold
    return request


def _root(stack: RunningStack, trace_id: str) -> Span:
    deadline = time.monotonic() + 20
    while True:
        roots = [
            s
            for s in stack.sink.spans_of(trace_id)
            if s.service == "router" and not s.parent_span_id
        ]
        if roots and "cachemesh.routing.score" in roots[0].attributes:
            return roots[0]
        assert time.monotonic() < deadline, "the router's root span was not exported"
        time.sleep(0.2)


def test_the_score_threshold_and_reason_are_on_the_response_and_the_span(
    client_a: Client, stack: RunningStack
) -> None:
    question = f"{MATH} ({uuid.uuid4().hex[:8]})"
    answer = client_a.complete(_ask(question, semantic=pb.SEMANTIC_MODE_USE))
    routing = answer.routing
    assert answer.served_by != pb.LAYER_SEMANTIC_CACHE
    assert -1.0 <= routing.score <= 1.0 and routing.reason
    assert routing.threshold == routing.base_threshold  # one question: no prefix to weigh
    assert answer.tier == ("large" if routing.score >= routing.threshold else "small")
    assert routing.embedding_source == "semantic_cache.lookup"  # L1's own vector, reused
    root = _root(stack, answer.trace_id)
    assert root.attributes["cachemesh.routing.score"] == pytest.approx(routing.score, abs=1e-6)
    assert root.attributes["cachemesh.routing.threshold"] == pytest.approx(routing.threshold)
    assert root.attributes["cachemesh.routing.reason"] == routing.reason
    assert root.attributes["cachemesh.routing.embedding_source"] == "semantic_cache.lookup"
    assert root.attributes["cachemesh.tier"] == answer.tier


def test_a_request_threshold_changes_the_tier(client_a: Client) -> None:
    low = client_a.complete(_ask(MATH, threshold=-1.0))
    high = client_a.complete(_ask(MATH, threshold=1.0))
    assert (low.tier, high.tier) == ("large", "small")
    assert low.routing.score == pytest.approx(high.routing.score)  # same question, same score
    assert low.routing.threshold == -1.0 and high.routing.threshold == 1.0
    assert "the request's threshold" in high.routing.reason
    # L1 bypassed: the semantic cache embedded the question without a lookup
    assert high.routing.embedding_source == "semantic_cache.embed"


def test_a_conversation_warm_on_the_large_model_stays_there(client_a: Client) -> None:
    def system() -> str:
        tag = uuid.uuid4().hex
        rules = " ".join(f"Rule {i}: a checked bag over 23 kg costs a fee." for i in range(150))
        return f"Support desk {tag}. {rules}"

    warm = system()
    first = client_a.complete(_ask("What does a 25 kg bag cost?", threshold=-1.0, system=warm))
    assert first.tier == "large"  # the prefix is now warm on the large model
    history = (
        pb.Message(
            role=pb.ROLE_USER, content=[pb.ContentBlock(text="What does a 25 kg bag cost?")]
        ),
        pb.Message(role=pb.ROLE_ASSISTANT, content=first.content),
    )
    # a threshold no cold question reaches: alone it would go to the small model ...
    cold = client_a.complete(_ask("And a 30 kg one?", threshold=0.9, system=system()))
    assert cold.tier == "small" and cold.routing.base_threshold == pytest.approx(0.9)
    # ... but the conversation's prefix is warm on the large model: it stays
    kept = client_a.complete(_ask("And a 30 kg one?", threshold=0.9, system=warm, history=history))
    assert kept.tier == "large", kept.routing.reason
    assert kept.routing.base_threshold == pytest.approx(0.9)
    assert kept.routing.threshold < kept.routing.score
    assert "kept on the large tier" in kept.routing.reason
    assert kept.usage.cache_read_input_tokens > 0
