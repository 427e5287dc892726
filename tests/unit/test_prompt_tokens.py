"""prompt_tokens: the count an L1 hit prices its baseline with, equal to the billed prompt's."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import cacheable_tokens, canonical_blocks, prompt_tokens
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


def test_the_cacheable_tokens_end_at_the_last_breakpoint() -> None:
    """What a provider could read from its cache: the canonical prompt up to its last cache
    breakpoint, 0 without one; the rest is surely new input."""
    tokenizer = load_cl100k()
    mark = pb.CacheControl()
    request = agent_request("m1", ["Where is my order?", "And the refund?"], ["It shipped."])
    for tool in request.tools:
        tool.ClearField("cache_control")
    request.system[-1].ClearField("cache_control")
    request.messages[-1].content[-1].ClearField("cache_control")
    assert cacheable_tokens(request, tokenizer) == 0
    request.system[-1].cache_control.CopyFrom(mark)
    blocks = canonical_blocks(request, tokenizer)
    through = next(i for i, b in enumerate(blocks) if b.breakpoint is not None)
    assert cacheable_tokens(request, tokenizer) == sum(b.tokens for b in blocks[: through + 1])
    request.messages[-1].content[-1].cache_control.CopyFrom(mark)  # the whole prompt
    assert cacheable_tokens(request, tokenizer) == prompt_tokens(request, tokenizer)
