"""``cachemesh_model_generations_total{outcome}`` of a model replica: a stream whose end is
``interrupted`` (the provider's stream broke, or the caller's deadline came) counts
``interrupted``, not ``ok``. Before: a call cut before its first token, which since 456b06d ends
with a start sent only to bill the prompt and an interrupted end (before that it failed
DEADLINE_EXCEEDED and counted ``refused``), counted ``ok``, and so did an answer cut mid-way:
the dashboard's non-ok panel showed neither. A fake Generate API stands for the provider
adapter (``tests/unit/test_provider_usage_before_token.py`` drives the real one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cachemesh.v1 import model_pb2
from services.model.metrics import ModelMetrics
from services.model.servicer import ModelService

MODEL = "claude-test"
START = model_pb2.GenerateChunk(start=model_pb2.GenerateStart(prompt_tokens=2000))
CUT_START = model_pb2.GenerateChunk(
    start=model_pb2.GenerateStart(prompt_tokens=2000, cut_before_first_token=True)
)


def _end(output_tokens: int, *, interrupted: bool) -> model_pb2.GenerateChunk:
    stop = "interrupted" if interrupted else "end_turn"
    return model_pb2.GenerateChunk(
        end=model_pb2.GenerateEnd(
            output_tokens=output_tokens, stop_reason=stop, interrupted=interrupted
        )
    )


class _Replays:
    """A Generate API answering every request with the same chunks."""

    def __init__(self, chunks: Sequence[model_pb2.GenerateChunk]) -> None:
        self._chunks = chunks

    async def generate(
        self, request: model_pb2.GenerateRequest, time_remaining_s: float | None = None
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        for chunk in self._chunks:
            yield chunk


class _Context:
    def time_remaining(self) -> float:
        return 30.0


class _Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


@pytest.mark.parametrize(
    ("chunks", "outcome"),
    [
        ([START, model_pb2.GenerateChunk(text="Refunds"), _end(1, interrupted=False)], "ok"),
        ([CUT_START, _end(0, interrupted=True)], "interrupted"),  # cut before its first token
        (
            [START, model_pb2.GenerateChunk(text="Refunds"), _end(1, interrupted=True)],
            "interrupted",
        ),
    ],
    ids=["whole", "cut-before-first-token", "cut-mid-way"],
)
async def test_a_stream_whose_end_is_interrupted_counts_interrupted(
    chunks: list[model_pb2.GenerateChunk], outcome: str
) -> None:
    registry = CollectorRegistry()
    service = ModelService("r1", _Replays(chunks), ModelMetrics(registry, [MODEL], _Ticks()))
    context = cast("grpc.aio.ServicerContext[Any, Any]", _Context())
    request = model_pb2.GenerateRequest(model=MODEL)
    sent = [chunk async for chunk in service.Generate(request, context)]
    assert sent == chunks  # passed on as they came: only the count differs
    counts = {
        kind: registry.get_sample_value(
            "cachemesh_model_generations_total", {"model": MODEL, "outcome": kind}
        )
        for kind in ("ok", "interrupted")
    }
    assert counts == {kind: (1.0 if kind == outcome else None) for kind in counts}
