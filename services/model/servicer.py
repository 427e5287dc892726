"""The gRPC face of the simulated engine: cachemesh.v1.Model.Generate (server streaming)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace

from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.errors import RequestError
from services.common.status import grpc_code
from services.model.engine import Delta, Event, Finished, SimEngine, Started

log = logging.getLogger("cachemesh.model")


class ModelService(model_pb2_grpc.ModelServicer):
    """Answers UNAVAILABLE until ``attach`` hands it the engine (after the tokenizer loads)."""

    def __init__(self, replica_id: str, engine: SimEngine | None = None) -> None:
        self._replica_id = replica_id
        self._engine = engine

    def attach(self, engine: SimEngine) -> None:
        self._engine = engine

    async def Generate(
        self,
        request: model_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        span = trace.get_current_span()
        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.request.model", request.model)
        span.set_attribute("cachemesh.replica", self._replica_id)
        engine = self._engine
        if engine is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"model replica {self._replica_id} is still loading its tokenizer; retry shortly",
            )
            return
        try:
            prepared = await asyncio.to_thread(
                engine.prepare, request.tenant, request.model, request.request
            )
        except RequestError as error:
            await context.abort(grpc_code(error.code), error.message)
            return
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
    elif isinstance(event, Finished):
        span.set_attribute("gen_ai.usage.output_tokens", event.output_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [event.stop_reason])


def _chunk(event: Event) -> model_pb2.GenerateChunk:
    if isinstance(event, Started):
        return model_pb2.GenerateChunk(
            start=model_pb2.GenerateStart(
                replica=event.replica,
                prompt_tokens=event.prompt_tokens,
                kv_cached_tokens=event.kv_cached_tokens,
            )
        )
    if isinstance(event, Delta):
        return model_pb2.GenerateChunk(text=event.text)
    return model_pb2.GenerateChunk(
        end=model_pb2.GenerateEnd(output_tokens=event.output_tokens, stop_reason=event.stop_reason)
    )
