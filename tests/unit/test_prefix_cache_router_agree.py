"""The router's validation and prefix-cache's rule checks agree: a request one rejects for its
breakpoints the other rejects too, naming the same field (both say INVALID_ARGUMENT)."""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.prompt import canonical_blocks
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.auto_rules import plan_for
from services.prefix_cache.rules import RuleViolation
from services.prefix_cache.sites import sites_of
from services.router.validation import validate_request

TABLE = load_model_table()
CC, CC_1H = pb.CacheControl(), pb.CacheControl(ttl=pb.CACHE_TTL_1H)


def _request(*blocks: pb.ContentBlock) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text="You help.", cache_control=CC_1H)],
        messages=[pb.Message(role=pb.ROLE_USER, content=list(blocks))],
        max_tokens=10,
    )


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request(*(pb.ContentBlock(text=f"p{i}", cache_control=CC) for i in range(4))), "content"),
        (
            _request(
                pb.ContentBlock(text="a", cache_control=CC),
                pb.ContentBlock(text="b", cache_control=CC_1H),
            ),
            "messages[0].content[1]",
        ),
        (
            _request(pb.ContentBlock(text="a"), pb.ContentBlock(text="", cache_control=CC)),
            "messages[0].content[1]",
        ),
    ],
    ids=["fifth_breakpoint", "1h_after_5m", "empty_block_breakpoint"],
)
@pytest.mark.parametrize("model", ["sim-large", "claude-sonnet-4", "gpt-4o", "llama-3-1-8b-vllm"])
def test_both_reject_the_same_bad_breakpoints(
    tokenizer: Tokenizer, request_: pb.CompleteRequest, field: str, model: str
) -> None:
    with pytest.raises(RequestError) as router_error:
        validate_request(request_, TABLE, set(TABLE.models))
    assert router_error.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(RuleViolation) as rule_error:
        plan_for(canonical_blocks(request_, tokenizer), sites_of(request_), TABLE.models[model], 20)
    assert field in router_error.value.message and field in str(rule_error.value)


@pytest.mark.parametrize("model", ["sim-large", "claude-sonnet-4", "gpt-4o", "llama-3-1-8b-vllm"])
def test_both_accept_1h_before_5m_and_four_breakpoints(tokenizer: Tokenizer, model: str) -> None:
    request = _request(
        pb.ContentBlock(text="a", cache_control=CC_1H),
        pb.ContentBlock(text="b", cache_control=CC),
        pb.ContentBlock(text="c", cache_control=CC),
    )
    validate_request(request, TABLE, set(TABLE.models))
    plan_for(canonical_blocks(request, tokenizer), sites_of(request), TABLE.models[model], 20)
