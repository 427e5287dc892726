"""Plan, Commit and Totals without gRPC: validation, the stores and the pure rules wired up.

Errors are exceptions the servicer maps to status codes: ``BadRequest`` and ``RuleViolation``
→ INVALID_ARGUMENT, ``NoWarmCommit`` → FAILED_PRECONDITION, ``NotReady`` → UNAVAILABLE. Every
check runs before any state changes, so bad input changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import Clock
from services.common.models import AUTO, ModelSpec, ModelTable
from services.common.prompt import Block, canonical_blocks
from services.common.tokens import Tokenizer
from services.prefix_cache.pricing import Charge, charge
from services.prefix_cache.records import CommitRecords, Final
from services.prefix_cache.rules import Probe, PromptPlan, Split, Write, plan_prompt, settle
from services.prefix_cache.sites import sites_of
from services.prefix_cache.totals import TenantTotals, TotalsLedger
from services.prefix_cache.warm import WarmStore

# How long a replica is assumed to keep a prefix in KV cache after it last served it.
REPLICA_TTL_MS = 300_000


class BadRequest(ValueError):
    """INVALID_ARGUMENT; the message names the field."""


class NoWarmCommit(LookupError):
    """FAILED_PRECONDITION: FINAL without an earlier WARM for the request id."""


class NotReady(RuntimeError):
    """UNAVAILABLE: the tokenizer is still loading."""


class TokenizerSlot:
    """Filled by the service's warm-up; empty until then."""

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self._tokenizer = tokenizer

    def set(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def get(self) -> Tokenizer:
        if self._tokenizer is None:
            raise NotReady("prefix-cache is still loading its tokenizer; retry shortly")
        return self._tokenizer


@dataclass(frozen=True)
class Candidate:
    replica: str
    warm_prefix_tokens: int


@dataclass(frozen=True)
class PlanResult:
    split: Split
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class FinalResult:
    split: Split
    output_tokens: int
    kv_cached_tokens: int
    charge: Charge


@dataclass(frozen=True)
class _Prompt:
    blocks: list[Block]
    plan: PromptPlan


class PrefixCacheCore:
    def __init__(
        self,
        *,
        table: ModelTable,
        tokenizer: TokenizerSlot,
        cache: WarmStore,
        replicas: WarmStore,
        records: CommitRecords,
        totals: TotalsLedger,
        clock: Clock,
        lookback: int,
    ) -> None:
        self._table = table
        self._tokenizer = tokenizer
        self._cache = cache
        self._replicas = replicas
        self._records = records
        self._totals = totals
        self._clock = clock
        self._lookback = lookback
        self._commit_lock = asyncio.Lock()

    async def plan(
        self, tenant: str, model: str, request: pb.CompleteRequest | None, replicas: Sequence[str]
    ) -> PlanResult:
        _require(tenant, "tenant")
        spec = self._spec(model, "model")
        prompt = await self._prompt(request, spec)
        now = self._clock.now_ms()
        hit = await self._cache.longest((tenant, spec.id), prompt.plan.probes, now)
        split = settle(prompt.plan, hit.tokens if hit else 0)
        boundaries = _boundaries(prompt.blocks)
        candidates = []
        for replica in replicas:
            warm = await self._replicas.longest((tenant, spec.id, replica), boundaries, now)
            candidates.append(Candidate(replica, warm.tokens if warm else 0))
        candidates.sort(key=lambda c: -c.warm_prefix_tokens)  # stable: ties keep input order
        return PlanResult(split, tuple(candidates))

    async def warm(
        self,
        tenant: str,
        request_id: str,
        model: str,
        request: pb.CompleteRequest | None,
        replica: str,
    ) -> Split:
        _require(tenant, "tenant")
        _require(request_id, "request_id")
        spec = self._spec(model, "model")
        if (done := self._records.get(tenant, request_id, self._clock.now_ms())) is not None:
            return done.split
        prompt = await self._prompt(request, spec)
        async with self._commit_lock:
            now = self._clock.now_ms()
            if (done := self._records.get(tenant, request_id, now)) is not None:
                return done.split  # a concurrent retry committed first
            plan = prompt.plan
            hit = await self._cache.settle((tenant, spec.id), plan.probes, plan.writes, now)
            split = settle(plan, hit.tokens if hit else 0)
            if replica:
                marks = [
                    Write(p.digest, p.tokens, REPLICA_TTL_MS) for p in _boundaries(prompt.blocks)
                ]
                await self._replicas.settle((tenant, spec.id, replica), (), marks, now)
            self._records.put_warm(tenant, request_id, spec.id, replica, split, now)
            return split

    async def final(
        self,
        tenant: str,
        request_id: str,
        model: str,
        output_tokens: int,
        kv_cached_tokens: int,
        baseline_model: str,
    ) -> FinalResult:
        _require(tenant, "tenant")
        _require(request_id, "request_id")
        if output_tokens < 0:
            raise BadRequest(f"output_tokens must be >= 0, got {output_tokens}")
        if kv_cached_tokens < 0:
            raise BadRequest(f"kv_cached_tokens must be >= 0, got {kv_cached_tokens}")
        baseline_spec = self._spec(baseline_model, "baseline_model") if baseline_model else None
        async with self._commit_lock:
            now = self._clock.now_ms()
            record = self._records.get(tenant, request_id, now)
            if record is None:
                raise NoWarmCommit(
                    f"no WARM commit for request_id {request_id!r} of this tenant (never made, "
                    "or expired): commit phase WARM with the request before FINAL"
                )
            if model and model != record.model:
                raise BadRequest(
                    f"model {model!r} differs from {record.model!r} of the WARM commit for "
                    f"request_id {request_id!r}; send the same model or leave it empty"
                )
            if record.final is not None:
                return _final_result(record.split, record.final)
            spec = self._table.get(record.model)
            assert spec is not None  # checked at WARM against the same table
            money = charge(record.split, output_tokens, spec, baseline_spec or spec)
            final = Final(output_tokens, kv_cached_tokens, (baseline_spec or spec).id, money)
            self._totals.add(tenant, record.split, output_tokens, kv_cached_tokens, money)
            self._records.put_final(tenant, request_id, record, final, now)
            return _final_result(record.split, final)

    def totals(self, tenant: str) -> TenantTotals:
        _require(tenant, "tenant")
        return self._totals.get(tenant)

    def _spec(self, model_id: str, field: str) -> ModelSpec:
        spec = self._table.get(model_id)
        if spec is None:
            known = ", ".join(sorted(self._table.models))
            hint = " (resolve 'auto' to a tier's model first)" if model_id == AUTO else ""
            raise BadRequest(
                f"{field} {model_id!r} is not a known model{hint}; use one of: {known}"
            )
        return spec

    async def _prompt(self, request: pb.CompleteRequest | None, spec: ModelSpec) -> _Prompt:
        if request is None:
            raise BadRequest("request is required: send the CompleteRequest being served")
        tokenizer = self._tokenizer.get()
        blocks = await asyncio.to_thread(canonical_blocks, request, tokenizer)
        return _Prompt(blocks, plan_prompt(blocks, sites_of(request), spec, self._lookback))


def _require(value: str, field: str) -> None:
    if not value:
        raise BadRequest(f"{field} is required and must not be empty")


def _boundaries(blocks: Sequence[Block]) -> list[Probe]:
    probes, total = [], 0
    for block in blocks:
        total += block.tokens
        probes.append(Probe(block.digest, total))
    return probes


def _final_result(split: Split, final: Final) -> FinalResult:
    return FinalResult(split, final.output_tokens, final.kv_cached_tokens, final.charge)
