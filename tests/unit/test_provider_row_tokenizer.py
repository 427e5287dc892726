"""A provider replica counts what its model wrote, when the provider did not (a stream cut
before its usage, or an engine without usage reports), with the row's own tokenizer: o200k_base
for an OpenAI row. It was cl100k_base for every row. The adapter is a fake that writes, then
breaks."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import httpx2

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.models import ModelSpec, load_model_table
from services.common.tokens import CL100K, O200K, load_vocabulary
from services.model.providers.api import ProviderApi
from services.model.providers.progress import Progress
from tests.providers.replica import provider_replica, provider_settings

MODEL = "gpt-4o"
TABLE = load_model_table()
JAPANESE = "返品は購入から三十日以内に受け付けます。送料は当社が負担します。" * 20


@dataclass
class BreakingAdapter:
    """Writes the text (and a tool call's arguments), then the connection drops."""

    backend: str = "openai"

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        yield progress.start(40)
        yield progress.text(JAPANESE)
        progress.tool_piece('{"note": "' + JAPANESE + '"}')
        raise httpx2.ReadError("connection reset")

    async def close(self) -> None:
        return None


def _api() -> ProviderApi:
    settings = provider_settings("openai", "http://127.0.0.1:1/v1", "sk-test")
    # counting with the row's own vocabulary (o200k_base), as serve() loads it
    return provider_replica(settings, [MODEL], adapter=BreakingAdapter(), replica_id="openai-1")


async def test_a_gpt_4o_stream_cut_midway_counts_its_output_with_o200k() -> None:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="返品の期限は\uff1f")])
    request = pb.CompleteRequest(model=MODEL, max_tokens=2000, messages=[question])
    chunks = [
        c
        async for c in _api().generate(
            model_pb2.GenerateRequest(tenant="t", model=MODEL, request=request)
        )
    ]
    end = chunks[-1].end
    assert end.interrupted
    arguments = '{"note": "' + JAPANESE + '"}'
    o200k, cl100k = load_vocabulary(O200K), load_vocabulary(CL100K)
    assert end.output_tokens == o200k.count(JAPANESE) + o200k.count(arguments)
    assert end.output_tokens != cl100k.count(JAPANESE) + cl100k.count(arguments)
