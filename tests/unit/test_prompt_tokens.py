"""prompt_tokens: the count an L1 hit prices its baseline with, equal to the billed prompt's."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import canonical_blocks, prompt_tokens
from services.common.tokens import load_cl100k
from tests.integration.prompts import agent_request


def test_equals_the_canonical_blocks_token_count() -> None:
    tokenizer = load_cl100k()
    requests = [
        agent_request("m1", ["Where is my order?", "And the refund?"], ["It shipped."]),
        pb.CompleteRequest(
            model="sim-small",
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi there")])],
        ),
    ]
    for request in requests:
        blocks = canonical_blocks(request, tokenizer)
        assert prompt_tokens(request, tokenizer) == sum(b.tokens for b in blocks) > 0


def test_a_known_prompt_has_its_pinned_count() -> None:
    # "\n\nuser: Hi there" in cl100k_base: "\n\n", "user", ":", " Hi", " there"
    request = pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi there")])],
    )
    assert prompt_tokens(request, load_cl100k()) == 5
