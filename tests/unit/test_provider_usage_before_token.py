"""A deadline that passes after the provider reported the prompt's usage (Anthropic's
message_start, which it bills from) but before the first token: the replica ends the call a
margin before the deadline with a start and an interrupted end carrying that usage, as it does
for an answer under way, so the router bills the provider's figures. Without a report (OpenAI's
usage comes only at the end) there is nothing to bill from: DEADLINE_EXCEEDED, as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code, RequestError
from services.common.models import ModelSpec
from services.common.tokens import Tokenizer, load_cl100k
from services.model.providers.progress import Progress
from tests.unit.test_provider_deadline import _generate, _real_time_api

INPUT, CACHE_WRITE, CACHE_READ = 12, 5000, 300


@dataclass
class ReportedThenStalled:
    """Reports the prompt's usage (``report``: Anthropic's message_start; else none, as
    OpenAI's stream before its first token), then stalls before any token."""

    report: bool = True
    backend: str = "anthropic"
    closed: bool = False

    async def stream(
        self, spec: ModelSpec, request: pb.CompleteRequest, progress: Progress, timeout_s: float
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        try:
            if self.report:
                usage = pc.AnthropicUsage(
                    input_tokens=INPUT,
                    cache_creation_input_tokens=CACHE_WRITE,
                    cache_read_input_tokens=CACHE_READ,
                    output_tokens=1,  # message_start's placeholder
                )
                usage.cache_creation.ephemeral_5m_input_tokens = CACHE_WRITE
                yield progress.reported(pc.ProviderUsage(anthropic=usage))
            await asyncio.sleep(5.0)
            yield progress.start(INPUT + CACHE_WRITE + CACHE_READ)
        finally:
            self.closed = True

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


async def test_a_call_cut_after_the_usage_report_ends_with_it(tokenizer: Tokenizer) -> None:
    adapter = ReportedThenStalled()
    api = _real_time_api(adapter, tokenizer)  # type: ignore[arg-type]
    chunks = [c async for c in api.generate(_generate(), 0.1)]
    assert [c.WhichOneof("part") for c in chunks] == ["start", "end"]
    assert chunks[0].start.prompt_tokens == INPUT + CACHE_WRITE + CACHE_READ
    assert chunks[0].start.cut_before_first_token  # no first token: the router's health rule
    end = chunks[1].end
    assert end.interrupted and "deadline" in end.error and end.output_tokens == 0
    usage = end.provider_usage.anthropic
    assert (usage.input_tokens, usage.cache_creation_input_tokens) == (INPUT, CACHE_WRITE)
    assert usage.cache_read_input_tokens == CACHE_READ
    assert usage.cache_creation.ephemeral_5m_input_tokens == CACHE_WRITE
    assert usage.output_tokens == 0  # nothing written: not message_start's placeholder
    assert adapter.closed


async def test_a_call_cut_before_any_report_fails_as_before(tokenizer: Tokenizer) -> None:
    adapter = ReportedThenStalled(report=False, backend="openai")
    api = _real_time_api(adapter, tokenizer)  # type: ignore[arg-type]
    with pytest.raises(RequestError) as caught:
        _ = [c async for c in api.generate(_generate(), 0.1)]
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert adapter.closed
