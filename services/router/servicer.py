"""The public ``cachemesh.v1.Gateway``: auth, validation, answer-once, then the pipeline."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.auth import ApiKeys, bearer_token
from services.common.errors import Code, RequestError
from services.common.models import ModelTable
from services.common.retry_info import retry_trailers
from services.common.status import grpc_code
from services.router.access_log import Call, RequestLog
from services.router.idempotency import IdempotencyConflict, IdempotencyTable
from services.router.limits import Denial, Limiter, Ticket
from services.router.pipeline import Pipeline, chunks_of
from services.router.validation import validate_request

Context = grpc.aio.ServicerContext[Any, Any]

_UNAUTHENTICATED = (
    "send 'authorization: Bearer <key>' metadata with an API key issued for your tenant"
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        keys: ApiKeys,
        table: ModelTable,
        deployed: set[str],
        pipeline: Pipeline,
        answers: IdempotencyTable,
        limiter: Limiter,
        log: RequestLog,
    ) -> None:
        self._keys = keys
        self._table = table
        self._deployed = deployed
        self._pipeline = pipeline
        self._answers = answers
        self._limiter = limiter
        self._log = log  # the access-log line and the request metrics, when a call ends

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        call = self._log.begin("Complete")
        ended = ""
        try:
            ticket = await self._admit(request, context, call)
            try:
                async with aclosing(
                    self._answered(ticket, request, call, streamed=False)
                ) as chunks:
                    async for chunk in chunks:
                        if chunk.WhichOneof("part") == "end":
                            ended = "OK"
                            return chunk.end
            except RequestError as exc:
                await context.abort(grpc_code(exc.code), exc.message)
            await context.abort(grpc.StatusCode.INTERNAL, "the request ended without an answer")
            raise AssertionError("unreachable: abort raises")
        except asyncio.CancelledError:
            ended = "CANCELLED"
            raise
        finally:
            self._log.finish(call, request, _status(context, ended))

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:
        call = self._log.begin("StreamComplete")
        ended = ""
        try:
            ticket = await self._admit(request, context, call)
            try:
                async with aclosing(self._answered(ticket, request, call)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                ended = "OK"
            except RequestError as exc:
                await context.abort(grpc_code(exc.code), exc.message)
        except (asyncio.CancelledError, GeneratorExit):
            ended = "CANCELLED"
            raise
        finally:
            self._log.finish(call, request, _status(context, ended))

    async def _admit(self, request: pb.CompleteRequest, context: Context, call: Call) -> Ticket:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no API key: " + _UNAUTHENTICATED)
        tenant = self._keys.tenant_for(token or "")
        if tenant is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "unknown API key: " + _UNAUTHENTICATED
            )
        call.tenant = tenant or ""
        try:
            validate_request(request, self._table, self._deployed)
        except RequestError as exc:
            await context.abort(grpc_code(exc.code), exc.message)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        assert tenant is not None
        admitted = await self._limiter.admit(tenant, request)
        if isinstance(admitted, Denial):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                admitted.message,
                trailing_metadata=retry_trailers(
                    Code.RESOURCE_EXHAUSTED,
                    admitted.message,
                    admitted.retry_after_ms,
                    f"tenant:{tenant}",
                    admitted.limit,
                ),
            )
            raise AssertionError("unreachable: abort raises")
        return admitted

    async def _answered(
        self, ticket: Ticket, request: pb.CompleteRequest, call: Call, *, streamed: bool = True
    ) -> AsyncGenerator[pb.CompleteChunk, None]:
        """The request's chunks, once per request_id: a retry replays the first answer."""
        tenant = ticket.tenant
        try:
            claimed, future = self._answers.claim(tenant, request)
        except IdempotencyConflict as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if not claimed:
            self._limiter.replayed(ticket)
            call.replayed = True
            for chunk in chunks_of(await asyncio.shield(future)):
                if chunk.WhichOneof("part") == "end":
                    call.end = chunk.end
                yield chunk
            return
        end: pb.CompleteResponse | None = None
        try:
            async with aclosing(self._pipeline.run(tenant, request, streamed=streamed)) as chunks:
                async for chunk in chunks:
                    if chunk.WhichOneof("part") == "end":
                        end = call.end = chunk.end
                    yield chunk
        finally:
            _settle(self._answers, tenant, request, future, end)
            self._limiter.settle(ticket, end)


def _status(context: Context, ended: str) -> str:
    """The call's gRPC status name: what it aborted with, else how it ended (``ended``: OK or
    CANCELLED; empty when it raised something else, which gRPC reports as UNKNOWN)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return ended or "UNKNOWN"


def _settle(
    answers: IdempotencyTable,
    tenant: str,
    request: pb.CompleteRequest,
    future: asyncio.Future[pb.CompleteResponse],
    end: pb.CompleteResponse | None,
) -> None:
    """Resolves the answer-once record: the answer, or release the id for a retry."""
    if future.done():
        return
    if end is not None:
        future.set_result(end)
        return
    answers.release(tenant, request.request_id)
    future.set_exception(
        RequestError(
            Code.UNAVAILABLE,
            f"the first call with request_id {request.request_id!r} failed; retry it",
        )
    )
    future.exception()  # mark retrieved: a failure with no waiter is not an error
