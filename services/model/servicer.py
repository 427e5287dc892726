"""The gRPC face of a model replica (the simulated engine or a provider adapter):
cachemesh.v1.Model.Generate (server streaming)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.errors import RequestError
from services.common.status import grpc_code
from services.model.metrics import ModelMetrics

log = logging.getLogger("cachemesh.model")


def _log_chunk(model: str, chunk: model_pb2.GenerateChunk) -> None:
    part = chunk.WhichOneof("part")
    if part == "start":
        start = chunk.start
        log.debug(
            "generate %s: %d prompt tokens, %d from the KV cache",
            model,
            start.prompt_tokens,
            start.kv_cached_tokens,
        )
    elif part == "end":
        end = chunk.end
        log.debug("generated %s: %d output tokens (%s)", model, end.output_tokens, end.stop_reason)


# the trailer carrying a refusal's short reason (RequestError.reason) to the router
REASON_KEY = "cachemesh-reason"
# and the one carrying the whole seconds its provider asked to be left alone (a 429's
# retry-after that outlasted the call's deadline: RequestError.retry_after_s)
RETRY_AFTER_KEY = "retry-after"
# and the mark of a refusal after the replica's own retries of its provider were spent
# (RequestError.retried): the router tells its client not to retry it at once
RETRIED_KEY = "cachemesh-retried"
# and where that retry-after came from: "provider" (its own retry-after) or "backoff" (the
# replica's next backoff after its retries, RequestError.backoff_wait), so that the router
# says "as the provider asked" only of a provider's wait
RETRY_AFTER_FROM_KEY = "cachemesh-retry-after-from"


def _trailers(error: RequestError) -> tuple[tuple[str, str], ...]:
    trailers: list[tuple[str, str]] = [(REASON_KEY, error.reason)] if error.reason else []
    if error.retry_after_s is not None:
        trailers.append((RETRY_AFTER_KEY, str(error.retry_after_s)))
        source = "backoff" if error.backoff_wait else "provider"
        trailers.append((RETRY_AFTER_FROM_KEY, source))
    if error.retried:
        trailers.append((RETRIED_KEY, "1"))
    return tuple(trailers)


class GenerateApi(Protocol):
    def generate(
        self, request: model_pb2.GenerateRequest, time_remaining_s: float | None = None
    ) -> AsyncIterator[model_pb2.GenerateChunk]: ...


class ModelService(model_pb2_grpc.ModelServicer):
    """Answers UNAVAILABLE until ``attach`` hands it the API (after the tokenizer loads)."""

    def __init__(
        self,
        replica_id: str,
        api: GenerateApi | None = None,
        metrics: ModelMetrics | None = None,
    ) -> None:
        self._replica_id = replica_id
        self._api = api
        self._metrics = metrics

    def attach(self, api: GenerateApi) -> None:
        self._api = api

    async def Generate(
        self,
        request: model_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        if self._api is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"model replica {self._replica_id} is still loading its tokenizer; retry shortly",
            )
            return
        metrics = self._metrics
        if metrics is None:
            try:
                async for chunk in self._api.generate(request, context.time_remaining()):
                    yield chunk
            except RequestError as error:
                await context.abort(
                    grpc_code(error.code), error.message, trailing_metadata=_trailers(error)
                )
            return
        call = metrics.begin(request.model)
        outcome = "failed"
        try:
            # the caller's deadline (the router passes the request's own): retries and waits
            # that would outlast it are not started
            async for chunk in self._api.generate(request, context.time_remaining()):
                metrics.chunk(call, chunk)
                _log_chunk(request.model, chunk)
                yield chunk
            outcome = metrics.streamed(call)  # "interrupted" if its end says it was cut
        except RequestError as error:
            outcome = "refused"
            await context.abort(
                grpc_code(error.code), error.message, trailing_metadata=_trailers(error)
            )
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            metrics.end(call, outcome)
