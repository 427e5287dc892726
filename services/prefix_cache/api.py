"""``cachemesh.v1.PrefixCache`` without the transport: messages in, messages out.

The servicer (gRPC) and the offline estimator both call this; the core's errors become
``RequestError`` with their status code here, and a gRPC status only in the servicer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry import trace
from redis.exceptions import OutOfMemoryError, RedisError

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.errors import TABLE_LACKS_MODEL, Code, RequestError
from services.common.redis_pool import pool_exhausted
from services.prefix_cache.commit_records import Final
from services.prefix_cache.core import (
    BadRequest,
    NotReady,
    NoWarmCommit,
    PlanGone,
    PrefixCacheCore,
    TableLacksModel,
)
from services.prefix_cache.reconcile import BadUsage
from services.prefix_cache.rules import RuleViolation, Split
from services.prefix_cache.totals import TenantTotals

T = TypeVar("T")
log = logging.getLogger("cachemesh.prefix_cache")

_CODES: tuple[tuple[type[Exception], Code], ...] = (
    (BadRequest, Code.INVALID_ARGUMENT),
    (RuleViolation, Code.INVALID_ARGUMENT),
    (BadUsage, Code.INVALID_ARGUMENT),
    (NoWarmCommit, Code.FAILED_PRECONDITION),
    (PlanGone, Code.FAILED_PRECONDITION),
    (TableLacksModel, Code.FAILED_PRECONDITION),  # its WarmModelUnknown too
    (NotReady, Code.UNAVAILABLE),
)


_POOL_BUSY = (
    "prefix-cache's Redis connections were all busy (PREFIX_CACHE_REDIS_MAX_CONNECTIONS): "
    "retry; raise that bound if this lasts"
)


# a Redis at its maxmemory under noeviction answers PING and reads but refuses every write:
# retryable (the router keeps the bill and replays it), and the fix is the operator's
_OUT_OF_MEMORY = (
    "prefix-cache's Redis is out of memory (maxmemory reached under noeviction): nothing was "
    "recorded; retry later. Raise its maxmemory (CONFIG SET maxmemory) or free memory in it"
)


def _nothing() -> None:
    pass


class PrefixCacheApi:
    def __init__(
        self,
        core: PrefixCacheCore,
        redis_failed: Callable[[], None] = _nothing,
        max_send_bytes: int | None = None,
        *,
        pool_busy: Callable[[], None] = _nothing,
    ) -> None:
        """``redis_failed``: told of each call its Redis failed (``RedisHealth.failed``).
        ``max_send_bytes``: the largest answer sent (CACHEMESH_MAX_MESSAGE_BYTES; None: any).
        ``pool_busy``: told of each call that found none of its Redis connections free in
        time (the process's bound, PREFIX_CACHE_REDIS_MAX_CONNECTIONS: not a Redis failure,
        so not ``redis_failed``)."""
        self._core = core
        self._redis_failed = redis_failed
        self._pool_busy = pool_busy
        self._max_send_bytes = max_send_bytes

    async def plan(self, request: pc.PlanRequest) -> pc.PlanResponse:
        result = await self._refused(
            self._core.plan(
                request.tenant,
                request.model,
                request.request if request.HasField("request") else None,
                list(request.replicas),
            )
        )
        prompt = result.prompt
        log.debug(
            "plan %s for tenant %s: %d prompt tokens, %d read from the cache",
            request.model,
            request.tenant,
            result.split.prompt_tokens,
            result.split.read_tokens,
        )
        plan = pc.PlanResponse(
            plan_id=result.plan_id,
            prompt=PromptFacts(
                prompt_tokens=prompt.plan.prompt_tokens,
                kv_block_hashes=b"".join(prompt.kv_hashes),
                digest=prompt.digest,
            ),
            usage=usage_of(result.split),
            prompt_tokens=result.split.prompt_tokens,
            planned_at_ms=prompt.planned_at_ms,
            candidates=[
                pc.ReplicaCandidate(replica=c.replica, warm_prefix_tokens=c.warm_prefix_tokens)
                for c in result.candidates
            ],
        )
        if self._max_send_bytes is not None and plan.ByteSize() > self._max_send_bytes:
            # the prompt's KV block hashes (2 bytes a token) are over the message limit (a
            # prompt of many tiny parts, such as tools of a few bytes each, is more than a token
            # a byte): sent, the Plan failed with gRPC's "Sent message larger than max", which
            # the router passed on; without them the replica counts the prompt itself
            plan.ClearField("prompt")
        return plan

    async def commit(self, request: pc.CommitRequest) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_WARM:
            split = await self._refused(
                self._core.warm(
                    request.tenant,
                    request.request_id,
                    request.model,
                    request.request if request.HasField("request") else None,
                    request.replica,
                    request.kv_cached_tokens,
                    request.max_read_tokens if request.HasField("max_read_tokens") else None,
                    request.plan_id,
                    kv_cached_unreported=request.kv_cached_unreported,
                    planned_at_ms=(
                        request.planned_at_ms if request.HasField("planned_at_ms") else None
                    ),
                    arrived_at_ms=(
                        request.arrived_at_ms if request.HasField("arrived_at_ms") else None
                    ),
                    stalled_warm=list(request.stalled_warm_replicas),
                    replica_instance=request.replica_instance,
                )
            )
            log.debug(
                "WARM commit for tenant %s: %d written, %d read, %d uncached",
                request.tenant,
                split.creation_tokens,
                split.read_tokens,
                split.input_tokens,
            )
            return pc.CommitResponse(usage=usage_of(split))
        if request.phase == pc.COMMIT_PHASE_FINAL:
            stood = await self._refused(
                self._core.final_commit(
                    request.tenant,
                    request.request_id,
                    request.model,
                    request.output_tokens,
                    request.kv_cached_tokens,
                    request.baseline_model,
                    request.provider_usage if request.HasField("provider_usage") else None,
                )
            )
            response = final_response(stood.final)
            response.repeated = stood.repeated  # the bill was the first reply's already
            log.debug(
                "FINAL commit for tenant %s: %d nanos (reconciled %s, repeated %s)",
                request.tenant,
                response.cost.cost_nanos,
                response.reconciled,
                response.repeated,
            )
            span = trace.get_current_span()
            span.set_attribute("cachemesh.reconciled", response.reconciled)
            if response.reconciled:
                span.set_attribute("cachemesh.drift.prompt_tokens", response.drift.prompt_tokens)
                span.set_attribute("cachemesh.drift.cost_nanos", response.drift.cost_nanos)
            return response
        raise RequestError(
            Code.INVALID_ARGUMENT,
            "phase must be COMMIT_PHASE_WARM (first token) or COMMIT_PHASE_FINAL (answer ended)",
        )

    async def totals(self, request: pc.TotalsRequest) -> pc.TotalsResponse:
        return totals_response(await self._refused(self._core.totals(request.tenant)))

    async def totals_batch(self, request: pc.TotalsBatchRequest) -> pc.TotalsBatchResponse:
        found = await self._refused(self._core.totals_of(list(request.tenants)))
        return pc.TotalsBatchResponse(
            tenants=[pc.TenantTotals(tenant=t, totals=totals_response(v)) for t, v in found]
        )

    async def _refused(self, work: Awaitable[T]) -> T:
        """The core's answer; its errors as ``RequestError`` with their status code."""
        try:
            return await work
        except RedisError as exc:
            if pool_exhausted(exc):  # Redis may well answer: retryable, not its health's
                self._pool_busy()
                raise RequestError(Code.UNAVAILABLE, _POOL_BUSY) from exc
            self._redis_failed()  # its health checks at once (a write refused: NOT_SERVING)
            if isinstance(exc, OutOfMemoryError):
                raise RequestError(Code.UNAVAILABLE, _OUT_OF_MEMORY) from exc
            # its store is down (restarting): retryable, no detail leaked
            raise RequestError(
                Code.UNAVAILABLE, f"prefix-cache's Redis is unreachable ({type(exc).__name__})"
            ) from exc
        except Exception as exc:
            for kind, code in _CODES:
                if isinstance(exc, kind):
                    # the router tells this refusal apart by its mark (kept, not dropped)
                    mark = TABLE_LACKS_MODEL if isinstance(exc, TableLacksModel) else ""
                    raise RequestError(code, str(exc), mark=mark) from exc
            raise


def usage_of(split: Split, output_tokens: int = 0, kv_cached_tokens: int = 0) -> pb.Usage:
    usage = pb.Usage(
        input_tokens=split.input_tokens,
        cache_creation_input_tokens=split.creation_tokens,
        cache_read_input_tokens=split.read_tokens,
        output_tokens=output_tokens,
        kv_cached_tokens=kv_cached_tokens,
    )
    if split.creation_tokens:  # the write's TTL split, which its price depends on
        usage.cache_creation.ephemeral_5m_input_tokens = split.write_5m_tokens
        usage.cache_creation.ephemeral_1h_input_tokens = split.write_1h_tokens
    return usage


def final_response(final: Final) -> pc.CommitResponse:
    billed, est = final.split, final.estimate
    response = pc.CommitResponse(
        usage=usage_of(billed, final.output_tokens, final.kv_cached_tokens),
        cost=pb.Cost(
            cost_nanos=final.charge.cost_nanos,
            baseline_nanos=final.charge.baseline_nanos,
            saved_nanos=final.charge.saved_nanos,
        ),
        estimated_usage=usage_of(est, final.output_tokens, final.kv_cached_tokens),
        reconciled=final.reconciled,
    )
    if final.reconciled:
        response.drift.CopyFrom(
            pc.UsageDrift(
                prompt_tokens=billed.prompt_tokens - est.prompt_tokens,
                input_tokens=billed.input_tokens - est.input_tokens,
                cache_creation_input_tokens=billed.creation_tokens - est.creation_tokens,
                cache_read_input_tokens=billed.read_tokens - est.read_tokens,
                cost_nanos=final.charge.cost_nanos - final.estimate_charge.cost_nanos,
            )
        )
    return response


def totals_response(t: TenantTotals) -> pc.TotalsResponse:
    return pc.TotalsResponse(
        requests=t.requests,
        usage=pb.Usage(
            input_tokens=t.input_tokens,
            cache_creation_input_tokens=t.cache_creation_input_tokens,
            cache_read_input_tokens=t.cache_read_input_tokens,
            output_tokens=t.output_tokens,
            kv_cached_tokens=t.kv_cached_tokens,
        ),
        cost_nanos=t.cost_nanos,
        baseline_nanos=t.baseline_nanos,
        reconciled_requests=t.reconciled_requests,
        drift=pc.UsageDrift(
            prompt_tokens=t.drift_prompt_tokens,
            input_tokens=t.drift_input_tokens,
            cache_creation_input_tokens=t.drift_cache_creation_tokens,
            cache_read_input_tokens=t.drift_cache_read_tokens,
            cost_nanos=t.drift_cost_nanos,
        ),
        drift_abs_prompt_tokens=t.drift_abs_prompt_tokens,
    )
