"""Shared by the router's unit tests: a Gateway servicer on a fake (or a rig's) pipeline.

``gateway_servicer(pipeline, {key: tenant})`` is the servicer the router builds, with what a
test does not set made the plain way: the model table, both simulated models deployed, an
idempotency table of 100 answers for 60 s, no limits (counted in memory), the request metrics
in a registry of their own, the access lines through the logging module. A test that checks
one of them passes its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final, TypedDict, Unpack, cast

from cachemesh.v1 import gateway_pb2 as pb
from services.common.auth import ApiKeys, hash_key
from services.common.clock import Clock, SystemClock
from services.common.env import Env
from services.common.grace import GraceEnd
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.common.models import load_model_table
from services.router.access_log import RequestLog
from services.router.answer_ledger import AnswerLedger, LedgerOperation
from services.router.breaker import Breaker
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limit_settings import LimitSettings
from services.router.limit_store import LimitStore
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.metrics import RouterMetrics
from services.router.pipeline import Pipeline
from services.router.servicer import GatewayServicer

TABLE: Final = load_model_table()
DEPLOYED: Final = ("sim-small", "sim-large")
# how long a limits test over the real Redis waits for the store's answer: 30 s, not the
# default 0.5. Past it a request is admitted without limits (fail-open, documented), which a
# slow machine's Redis made a racing test read as 40 of 40 admitted. The tests of that timeout
# set their own.
PATIENT_STORE_S: Final = 30.0


def patient_limit_settings(env: Mapping[str, str]) -> LimitSettings:
    """The ``LimitSettings`` of ``env``, the store's answer waited for ``PATIENT_STORE_S``."""
    return LimitSettings.from_env(Env({**env, "ROUTER_LIMITS_TIMEOUT_S": str(PATIENT_STORE_S)}))


def no_prompt(request: pb.CompleteRequest) -> int:
    """A prompt's tokens, for a Limiter whose policies set no token rate (never called)."""
    raise AssertionError("no token rate in these tests")


def memory_limiter(policy: LimitPolicy | None = None, store: LimitStore | None = None) -> Limiter:
    """A Limiter of ``policy`` (None: no limits) counting in ``store`` (None: a new one in
    memory), by the system clock; ``policy`` sets no token rate (a prompt is never counted)."""
    return Limiter(
        store if store is not None else MemoryLimitStore(),
        UniformPolicies(policy if policy is not None else LimitPolicy()),
        SystemClock(),
        no_prompt,
    )


class GatewayOptions(TypedDict, total=False):
    """The servicer's own keyword arguments, passed on as given (its defaults otherwise)."""

    ledger: AnswerLedger | None
    ledger_failed: Callable[[LedgerOperation], None]
    ledger_breaker: Breaker | None
    clock: Clock | None
    grace_end: GraceEnd | None
    max_request_bytes: int


def gateway_servicer(
    pipeline: object,
    keys: Mapping[str, str],
    *,
    deployed: Iterable[str] = DEPLOYED,
    answers: IdempotencyTable | None = None,
    limiter: Limiter | None = None,
    metrics: RouterMetrics | None = None,
    lines: JsonLines | None = None,
    **options: Unpack[GatewayOptions],
) -> GatewayServicer:
    """A Gateway servicer whose pipeline is ``pipeline`` (a fake with the pipeline's ``run``,
    or a rig's real one) and whose API keys are ``keys`` (each key: its tenant).

    ``answers``: None, 100 answers kept 60 s by the system clock; ``limiter``: None, no limits
    (``memory_limiter()``); ``metrics``: None, in a registry of their own (four tenants
    labelled); ``lines``: the access lines' JSON writer (None: through the logging module).
    The access lines and metrics time a call by ``time.perf_counter``, as the router does."""
    return GatewayServicer(
        ApiKeys({hash_key(key): tenant for key, tenant in keys.items()}),
        TABLE,
        set(deployed),
        cast(Pipeline, pipeline),
        answers if answers is not None else IdempotencyTable(SystemClock(), 60, 100),
        limiter if limiter is not None else memory_limiter(),
        RequestLog(
            metrics if metrics is not None else RouterMetrics(new_registry(), TenantLabels(4)),
            TABLE,
            time.perf_counter,
            lines,
        ),
        **options,
    )
