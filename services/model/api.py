"""``cachemesh.v1.Model.Generate`` without the transport: a request in, its chunks out.

The servicer (gRPC) and the offline estimator both call this; a refused request raises
``RequestError`` (before the first chunk), which only the servicer turns into a gRPC status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.model.engine import Call, Delta, Event, Finished, SimEngine, Started
from services.model.fair_queue import QUEUE_WAIT_ATTRIBUTE

log = logging.getLogger("cachemesh.model")


class ModelApi:
    def __init__(self, engine: SimEngine, *, offload: bool = True) -> None:
        """``offload``: a prompt the engine must tokenize itself is prepared in a worker
        thread, off the loop (with Plan's facts there is nothing heavy left to do)."""
        self._engine = engine
        self._offload = offload

    async def generate(
        self, request: model_pb2.GenerateRequest, time_remaining_s: float | None = None
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        """``time_remaining_s``: the call's deadline (the caller's gRPC deadline ends it)."""
        span = trace.get_current_span()
        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.request.model", request.model)
        span.set_attribute("cachemesh.replica", self._engine.replica_id)
        engine = self._engine
        facts = request.prompt if request.HasField("prompt") else None
        if self._offload and facts is None:  # tokenizing the prompt is worth a thread hop
            prepared = await asyncio.to_thread(
                engine.prepare, request.tenant, request.model, request.request
            )
        else:
            prepared = engine.prepare(request.tenant, request.model, request.request, facts)
        span.set_attribute("gen_ai.usage.input_tokens", prepared.prompt_tokens)
        try:
            async for event in engine.run(prepared):
                _annotate(span, event)
                yield _chunk(event)
        except asyncio.CancelledError:
            log.debug("Generate cancelled by the caller (tenant %s)", request.tenant)
            raise


def _annotate(span: trace.Span, event: Event) -> None:
    if isinstance(event, Started):
        span.set_attribute("cachemesh.kv_cached_tokens", event.kv_cached_tokens)
        # its wait for its turn in the replica's prefill queue (``fair_queue``)
        span.set_attribute(QUEUE_WAIT_ATTRIBUTE, round(event.queue_wait_s * 1000, 3))
    elif isinstance(event, Finished):
        span.set_attribute("gen_ai.usage.output_tokens", event.output_tokens)
        span.set_attribute("cachemesh.draft_accepted_tokens", event.draft_accepted_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [event.stop_reason])


def _chunk(event: Event) -> model_pb2.GenerateChunk:
    if isinstance(event, Started):
        return model_pb2.GenerateChunk(
            start=model_pb2.GenerateStart(
                replica=event.replica,
                prompt_tokens=event.prompt_tokens,
                kv_cached_tokens=event.kv_cached_tokens,
                backend="simulated",
                tenant_fair_queue=True,  # its prefill queue (``fair_queue``)
                engine_instance=event.engine_instance,
            )
        )
    if isinstance(event, Delta):
        return model_pb2.GenerateChunk(text=event.text)
    if isinstance(event, Call):
        return model_pb2.GenerateChunk(block=pb.ContentBlock(tool_use=event.call))
    return model_pb2.GenerateChunk(
        end=model_pb2.GenerateEnd(
            output_tokens=event.output_tokens,
            stop_reason=event.stop_reason,
            draft_accepted_tokens=event.draft_accepted_tokens,
        )
    )
