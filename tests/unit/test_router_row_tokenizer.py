"""The router's own counts use the tokenizer of the row they count for: o200k_base for an
OpenAI row (gpt-4o), cl100k_base for the others. They were all cl100k_base: a gpt-4o answer
cut before its usage was billed on a cl100k count of its text, an L1 hit's prompt and baseline
too, and the token rate reserved a cl100k count of the prompt."""

from __future__ import annotations

import asyncio
import contextlib

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.env import Env
from services.common.models import load_model_table
from services.common.prompt import prompt_tokens
from services.common.tokens import CL100K, O200K, load_tokenizers, load_vocabulary
from services.router.dependencies import CallFailed
from services.router.limit_settings import LimitSettings
from services.router.limit_tickets import Ticket
from services.router.limit_wiring import build_limiter
from tests.unit.test_router_partial_billing import Held
from tests.unit.test_router_pipeline import REPLICAS, FakeModels, FakeStream, Rig

TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())
GPT_4O = TABLE.models["gpt-4o"]
JAPANESE = "返品は購入から三十日以内に受け付けます。送料は当社が負担します。" * 20
O200K_COUNT = load_vocabulary(O200K).count(JAPANESE)


def _gpt_4o_request(text: str = "返品の期限は\uff1f") -> pb.CompleteRequest:
    return build_request(text, model="gpt-4o", request_id="r1")


class WritingModels(FakeModels):
    """A start, the Japanese text, then the rest still being written."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        chunks: list[model_pb2.GenerateChunk | CallFailed] = [
            model_pb2.GenerateChunk(
                start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
            ),
            model_pb2.GenerateChunk(text=JAPANESE),
        ]
        return Held(chunks)


def _rig(models: FakeModels | None = None) -> Rig:
    replicas = {**REPLICAS, "gpt-4o": ("openai-1",)}
    return Rig(models=models or FakeModels(), replicas=replicas, tokenizers=TOKENIZERS)


def test_the_two_vocabularies_count_the_text_differently() -> None:
    """Else the tests below could not tell them apart."""
    assert load_vocabulary(CL100K).count(JAPANESE) != O200K_COUNT


async def test_a_gpt_4o_call_left_midway_bills_its_text_counted_with_o200k() -> None:
    rig = _rig(models=WritingModels())
    pipeline = rig.pipeline()
    async with contextlib.aclosing(pipeline.run("tenant-a", _gpt_4o_request())) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta" and chunk.delta.text:
                break  # the client leaves with part of the answer
    await pipeline.drain()
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert final.output_tokens == O200K_COUNT


async def test_an_l1_hit_for_gpt_4o_counts_its_prompt_with_o200k() -> None:
    rig = _rig()
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text="三十日以内です。")],
        model="gpt-4o",
        tier=GPT_4O.tier,
        stop_reason="end_turn",
        output_tokens=5,
    )
    match = pb.SemanticMatch(similarity=0.95, entry_id="e1")
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=cached, match=match)
    request = _gpt_4o_request(JAPANESE)
    end = (await rig.run(request))[-1].end
    prompt = prompt_tokens(request, load_vocabulary(O200K))
    assert end.usage.input_tokens == prompt
    assert prompt != prompt_tokens(request, load_vocabulary(CL100K))
    assert end.cost.baseline_nanos == prompt * GPT_4O.input_nanos + 5 * GPT_4O.output_nanos


async def test_the_token_rate_reserves_a_gpt_4o_prompt_counted_with_o200k() -> None:
    settings = LimitSettings.from_env(Env({"ROUTER_LIMIT_TOKENS_PER_MIN": "1000000"}))
    limiter = await build_limiter(settings, ManualClock(), TABLE, TOKENIZERS)
    try:
        request = _gpt_4o_request(JAPANESE)
        ticket = await limiter.admit("tenant-a", request)
        assert isinstance(ticket, Ticket)
        prompt = prompt_tokens(request, load_vocabulary(O200K))
        assert ticket.reserved_tokens == prompt + request.max_tokens
    finally:
        await asyncio.wait_for(limiter.close(), 5)
