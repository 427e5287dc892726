"""Under a token rate the limits count a request's prompt for its reservation; the pipeline's
own counts of the same prompt (an L1 hit's usage, ``auto``'s context-window check while
prefix-cache is down) reuse that count: the prompt is tokenized once per request, not twice."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.env import Env
from services.common.prompt import canonical_blocks
from services.common.tokens import CL100K, Tokenizer, Tokenizers
from services.router.idempotency import IdempotencyTable
from services.router.limit_settings import LimitSettings
from services.router.limit_wiring import build_limiter
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY, FakeContext
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, Rig

PROMPT = "Our returns policy: " + "items may be returned within thirty days. " * 40


def _counting(monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer) -> Counter[str]:
    """Each text ``tokenizer`` encodes from now on, counted (its cache's hits too)."""
    encoded: Counter[str] = Counter()
    encode = tokenizer.encode

    def counted(text: str) -> tuple[int, ...]:
        encoded[text] += 1
        return encode(text)

    monkeypatch.setattr(tokenizer, "encode", counted)
    return encoded


async def _complete(rig: Rig, request: pb.CompleteRequest) -> pb.CompleteResponse:
    settings = LimitSettings.from_env(Env({"ROUTER_LIMIT_TOKENS_PER_MIN": "1000000"}))
    limiter = await build_limiter(settings, ManualClock(), TABLE, Tokenizers.of(rig.tokenizers))
    pipeline = rig.pipeline()
    answers = IdempotencyTable(ManualClock(), 60, 100)
    servicer = gateway_servicer(pipeline, {KEY: "tenant-a"}, answers=answers, limiter=limiter)
    try:
        return await servicer.Complete(request, FakeContext())  # type: ignore[arg-type]
    finally:
        await pipeline.drain()
        await asyncio.wait_for(limiter.close(), 5)


def _texts(request: pb.CompleteRequest) -> dict[str, int]:
    """Each block of ``request``'s canonical prompt, with its tokens."""
    return {b.text: b.tokens for b in canonical_blocks(request, TOKENIZER)}


async def test_an_l1_hit_under_a_token_rate_tokenizes_its_prompt_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert TOKENIZER.name == CL100K == TABLE.models["sim-large"].tokenizer
    rig = Rig()
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text="Within thirty days.")],
        model="sim-large",
        tier="large",
        stop_reason="end_turn",
        output_tokens=5,
    )
    match = pb.SemanticMatch(similarity=0.95, entry_id="e1")
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=cached, match=match)
    request = build_request(PROMPT, model="sim-large", request_id="r1")
    texts = _texts(request)
    encoded = _counting(monkeypatch, TOKENIZER)
    end = await _complete(rig, request)
    assert end.served_by == pb.LAYER_SEMANTIC_CACHE
    assert end.usage.input_tokens == sum(texts.values())
    assert {text: encoded[text] for text in texts} == dict.fromkeys(texts, 1)  # was 2 each


async def test_auto_with_prefix_cache_down_tokenizes_its_prompt_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its context-window check counts the prompt by each tier's tokenizer (cl100k for the
    simulator's rows): the limits' count, by the large tier's, is that count."""
    rig = Rig()
    rig.prefix.down = True
    request = build_request(PROMPT, model="auto", request_id="r2")
    texts = _texts(request)
    encoded = _counting(monkeypatch, TOKENIZER)
    end = await _complete(rig, request)
    assert end.served_by == pb.LAYER_MODEL
    assert {text: encoded[text] for text in texts} == dict.fromkeys(texts, 1)  # was 2 each
