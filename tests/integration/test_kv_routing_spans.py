"""L3 on the spans: the router's root and model-call spans name the chosen sim-large replica
(``cachemesh.replica``), the predicted warm prefix it was chosen for
(``cachemesh.kv_match_tokens``), the reason, and what the replica really reused
(``cachemesh.kv_cached_tokens``), as exported over OTLP to the test's receiver."""

from __future__ import annotations

import uuid

import pytest

from cachemesh import Client
from cachemesh.v1 import gateway_pb2 as pb
from services.common.kv_blocks import BLOCK_SIZE, reusable_blocks
from services.common.prompt import canonical_blocks, prompt_token_ids
from services.common.tokens import load_cl100k
from tests.integration.harness import RunningStack, router_spans

pytestmark = pytest.mark.integration


def _request(system: str, question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        max_tokens=16,
        system=[pb.ContentBlock(text=system)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),  # always a model call
    )


def test_the_spans_show_the_chosen_replica_and_its_match_length(
    client_a: Client, stack: RunningStack
) -> None:
    tag = uuid.uuid4().hex  # first in the prompt: no replica has any of its blocks yet
    system = f"Session {tag}. " + " ".join(
        f"Policy {i}: a checked bag over 23 kg costs a fee." for i in range(80)
    )
    first, second = _request(system, "What does bag 1 cost?"), _request(system, "And bag 2?")
    sim_large = {stack.addresses["model"], stack.addresses["model-2"]}

    one = client_a.complete(first)
    root, chat = router_spans(stack.sink, one.trace_id)
    chosen = chat.attributes["cachemesh.replica"]
    assert chosen in sim_large and root.attributes["cachemesh.replica"] == chosen
    assert chat.attributes["cachemesh.kv_match_tokens"] == 0  # a prefix never seen
    assert chat.attributes["cachemesh.route_reason"] == "ttft_cold"  # the TTFT policy
    assert chat.attributes["cachemesh.predicted_ttft_ms"] > 0
    assert chat.attributes["cachemesh.kv_cached_tokens"] == one.usage.kv_cached_tokens == 0

    # the second turn shares the system prompt: full blocks of 16, never the last token (vLLM)
    tokenizer = load_cl100k()
    ids1 = prompt_token_ids(canonical_blocks(first, tokenizer))
    ids2 = prompt_token_ids(canonical_blocks(second, tokenizer))
    common = next(i for i, (a, b) in enumerate(zip(ids1, ids2, strict=False)) if a != b)
    match = min(common // BLOCK_SIZE, reusable_blocks(len(ids2))) * BLOCK_SIZE
    assert match > 0.3 * len(ids2)

    two = client_a.complete(second)
    root, chat = router_spans(stack.sink, two.trace_id)
    for span in (root, chat):
        assert span.attributes["cachemesh.replica"] == chosen  # back to the warm replica
        assert span.attributes["cachemesh.kv_match_tokens"] == match
        assert span.attributes["cachemesh.route_reason"] == "ttft_warm"  # warm and fastest
    # the replica's own report agrees with prefix-cache's view (one prefix-cache: exact)
    assert chat.attributes["cachemesh.kv_cached_tokens"] == two.usage.kv_cached_tokens == match


def test_two_interleaved_conversations_each_stay_on_the_replica_holding_their_prefix(
    client_a: Client, stack: RunningStack
) -> None:
    tags = [uuid.uuid4().hex, uuid.uuid4().hex]
    systems = [
        f"Desk {tag}. " + " ".join(f"Rule {i}: refunds take {i} days." for i in range(60))
        for tag in tags
    ]
    homes: list[str] = []
    for system in systems:  # the first turns: cold, each where it starts soonest
        one = client_a.complete(_request(system, "First question?"))
        homes.append(router_spans(stack.sink, one.trace_id)[1].attributes["cachemesh.replica"])
    for turn in ("Second question?", "Third question?"):
        for system, home in zip(systems, homes, strict=True):
            reply = client_a.complete(_request(system, turn))
            _, chat = router_spans(stack.sink, reply.trace_id)
            assert chat.attributes["cachemesh.replica"] == home
            assert chat.attributes["cachemesh.route_reason"] in ("ttft_warm", "affinity_tie")
            # the engine's own count of reused tokens agrees with the predicted match
            assert chat.attributes["cachemesh.kv_match_tokens"] == reply.usage.kv_cached_tokens > 0
