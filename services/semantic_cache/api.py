"""``cachemesh.v1.SemanticCache`` without the transport: messages in, messages out.

The servicer (gRPC) and the offline estimator both call this; a refused request raises
``RequestError`` with its status code, which only the servicer turns into a gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import Code, RequestError
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import Answer, InvalidQuery

log = logging.getLogger("cachemesh.semantic_cache")
DRAINING = "semantic-cache is draining for shutdown: writes are refused; retry elsewhere"


def wait_budget(lease_wait_s: float, remaining_s: float | None) -> float:
    """The lease wait: the configured limit, within the caller's deadline less 100 ms."""
    if lease_wait_s <= 0:
        return 0.0
    if remaining_s is None:
        return lease_wait_s
    return max(0.0, min(lease_wait_s, remaining_s - 0.1))


class SemanticCacheApi:
    def __init__(
        self,
        cache: SemanticCache,
        lease_wait_s: float = 0.0,
        draining: asyncio.Event | None = None,
        metrics: SemanticCacheMetrics | None = None,
    ) -> None:
        self._cache = cache
        self._metrics = metrics  # None: the offline estimator
        self._lease_wait_s = lease_wait_s  # the most a lookup waits on another's lease
        self._draining = draining  # once set, writes are refused (UNAVAILABLE)

    async def lookup(
        self, request: sc.LookupRequest, remaining_s: float | None
    ) -> sc.LookupResponse:
        """``remaining_s``: what is left of the caller's deadline (None = no deadline)."""
        _require_tenant(request.tenant)
        draining = self._is_draining()
        query = _query(request.tenant, request.request)
        # a draining cache refuses Stores, so it leads no model call and makes none wait
        wait_s = 0.0 if draining else wait_budget(self._lease_wait_s, remaining_s)
        try:
            result = await self._cache.check(query, wait_s, lead=not draining)
        except InvalidQuery as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if self._metrics is not None:
            self._metrics.looked_up(request.tenant, result)
        log.debug(
            "lookup for tenant %s: %s, best similarity %.3f",
            request.tenant,
            "hit" if result.hit else "skipped" if result.skip_reason else "miss",
            result.best_similarity,
        )
        response = sc.LookupResponse(
            pending=result.pending,
            hit=result.hit,
            best_similarity=result.best_similarity,
            skip_reason=result.skip_reason,
            leader=result.leader,
            lease_id=result.lease_id,
            waited=result.waited,
            refusal=result.refusal,
        )
        if request.want_embedding and not result.hit and query.text and query.normalised:
            # the vector the check computed (or, with no check, this one): the Store reuses it
            vector = await self._cache.embedding(query.text)
            response.embedding = vector.astype("<f4").tobytes()
            response.embedder_version = self._cache.embedder_version
        if result.entry is not None:
            response.match.CopyFrom(
                pb.SemanticMatch(
                    similarity=result.similarity,
                    entry_id=result.entry.entry_id,
                    exact=result.exact,
                )
            )
            response.answer.ParseFromString(result.entry.answer.payload)
        return response

    async def store(self, request: sc.StoreRequest) -> sc.StoreResponse:
        _require_tenant(request.tenant)
        if self._is_draining():
            with contextlib.suppress(InvalidQuery):  # a refused Store still ends its lease
                self._cache.release(query_from_request(request.tenant, request.request))
            raise RequestError(Code.UNAVAILABLE, DRAINING)
        answer = request.answer
        if answer.output_tokens < 0:
            raise RequestError(Code.INVALID_ARGUMENT, "answer.output_tokens must be >= 0")
        record = Answer(
            payload=answer.SerializeToString(deterministic=True),
            stop_reason=answer.stop_reason,
            output_tokens=answer.output_tokens,
            has_tool_use=any(b.WhichOneof("kind") == "tool_use" for b in answer.content),
        )
        query = _query(request.tenant, request.request)
        try:
            result = await self._cache.store(query, record)
        except InvalidQuery as exc:
            raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if self._metrics is not None:
            self._metrics.stored(request.tenant, result.stored)
        log.debug(
            "store for tenant %s: %s", request.tenant, "stored" if result.stored else "skipped"
        )
        return sc.StoreResponse(
            stored=result.stored, entry_id=result.entry_id, skip_reason=result.skip_reason
        )

    async def drop(self, request: sc.DropRequest) -> sc.DropResponse:
        if self._is_draining():
            raise RequestError(Code.UNAVAILABLE, DRAINING)
        _require_tenant(request.tenant)
        if request.entry_id:
            dropped = self._cache.drop_entry(request.tenant, request.entry_id)
        else:
            dropped = self._cache.drop(request.tenant, request.namespace or None)
        await self._cache.sync_journal()  # durable before it is acknowledged
        return sc.DropResponse(dropped=dropped)

    async def release(self, request: sc.ReleaseRequest) -> sc.ReleaseResponse:
        _require_tenant(request.tenant)
        query = _query(request.tenant, request.request)
        return sc.ReleaseResponse(released=self._cache.release(query, request.lease_id or None))

    def _is_draining(self) -> bool:
        return self._draining is not None and self._draining.is_set()


def _query(tenant: str, request: pb.CompleteRequest) -> Query:
    try:
        return query_from_request(tenant, request)
    except InvalidQuery as exc:
        raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc


def _require_tenant(tenant: str) -> None:
    if not tenant:
        raise RequestError(
            Code.INVALID_ARGUMENT, "tenant is required: the router must pass the caller's tenant"
        )
