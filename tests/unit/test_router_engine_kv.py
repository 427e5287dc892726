"""A self-hosted engine behind a provider adapter (llama-server, vLLM) reports its KV reuse
only at the end (``prompt_tokens_details.cached_tokens``; its start is
``kv_cached_unreported``): that figure is the FINAL commit's ``kv_cached_tokens`` (prefix-cache
tells the tenant at most its own traffic's share of it), and when prefix-cache is down the
Gateway's ``usage.kv_cached_tokens`` is at most the WARM's read (0 without one), in the
engine's tokens."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from tests.unit.test_router_pipeline import FakeModels, FakePrefix, FakeStream, Rig, _request

PROMPT, CACHED = 1203, 1195  # what llama-server reported on a repeated prefix


class EngineReplicas(FakeModels):
    """Each replica answers as a provider adapter: a start that cannot tell its KV reuse,
    an end with the engine's OpenAI-shaped usage."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        start = model_pb2.GenerateStart(
            replica=replica, prompt_tokens=40, kv_cached_unreported=True, backend="openai"
        )
        end = model_pb2.GenerateEnd(output_tokens=3, stop_reason="end_turn")
        end.provider_usage.openai.CopyFrom(
            pc.OpenAIUsage(
                prompt_tokens=PROMPT,
                completion_tokens=3,
                total_tokens=PROMPT + 3,
                prompt_tokens_details=pc.OpenAIPromptTokensDetails(cached_tokens=CACHED),
            )
        )
        return FakeStream(
            [
                model_pb2.GenerateChunk(start=start),
                model_pb2.GenerateChunk(text="Thirty-three dollars."),
                model_pb2.GenerateChunk(end=end),
            ]
        )


class EchoingPrefix(FakePrefix):
    """prefix-cache's FINAL answers the commit's ``kv_cached_tokens`` in its usage."""

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        reply = await super().commit(request, deadline_s)
        if request.phase == pc.COMMIT_PHASE_FINAL:
            reply.usage.kv_cached_tokens = request.kv_cached_tokens
        return reply


async def test_the_engines_reported_kv_reuse_is_committed_and_reaches_the_usage() -> None:
    rig = Rig(prefix=EchoingPrefix(reported_read=CACHED), models=EngineReplicas())
    end = (await rig.run(_request("local-small")))[-1].end
    final = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert [c.kv_cached_tokens for c in final] == [CACHED]
    assert end.usage.kv_cached_tokens == CACHED
    assert end.served_by == pb.LAYER_PREFIX_CACHE


class FinalDown(FakePrefix):
    """prefix-cache answers the WARM (its read: the tenant's own reuse, of a prompt it counts
    ``warm_prompt`` tokens in cl100k's), then goes down."""

    warm_prompt: int = PROMPT

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_FINAL:
            self.down = True
        reply = await super().commit(request, deadline_s)
        reply.usage.input_tokens = self.warm_prompt - self.read_tokens
        return reply


async def test_with_prefix_cache_down_the_usage_tells_no_reuse_of_other_tenants() -> None:
    """The engine's KV cache is shared by every tenant: its reuse may be another tenant's
    prompt. Without prefix-cache's view of what this tenant's own traffic left there, the
    estimated answer tells none of it; with the WARM's read, at most that."""
    rig = Rig(prefix=FakePrefix(down=True), models=EngineReplicas())
    end = (await rig.run(_request("local-small")))[-1].end
    assert end.cost.estimated and end.usage.kv_cached_tokens == 0

    rig = Rig(prefix=FinalDown(read_tokens=16), models=EngineReplicas())
    end = (await rig.run(_request("local-small")))[-1].end
    assert end.cost.estimated and end.usage.kv_cached_tokens == 16


async def test_with_prefix_cache_down_the_usage_tells_the_own_reuse_in_the_engines_tokens() -> None:
    """The WARM's read counts prefix-cache's (cl100k) tokens, the engine's report its own. An
    engine counting fewer (1,203 for cl100k's 1,500) whose reuse reaches past the tenant's own
    640 tokens: before, the estimated answer told 640 of its 1,195 (the tenant's own part is
    513 of the engine's tokens: 127 of another tenant's reuse told); now 513. One counting
    more (1,203 for cl100k's 1,000) reusing the tenant's own prompt whole (the WARM read every
    full block, 992): before, 992 told; now the engine's 1,195."""
    fewer = FinalDown(read_tokens=640)
    fewer.warm_prompt = 1500
    end = (await Rig(prefix=fewer, models=EngineReplicas()).run(_request("local-small")))[-1].end
    assert end.cost.estimated and end.usage.kv_cached_tokens == 640 * PROMPT // 1500 == 513

    more = FinalDown(read_tokens=992)
    more.warm_prompt = 1000
    end = (await Rig(prefix=more, models=EngineReplicas()).run(_request("local-small")))[-1].end
    assert end.cost.estimated and end.usage.kv_cached_tokens == CACHED
