"""What the router's pipeline needs of its dependencies: small protocols, no transport.

The pipeline calls the semantic cache, prefix-cache and the model replicas through these;
``services.router.grpc_adapters`` implements them over gRPC for the live router, and
``services.tools.estimator.local_adapters`` over the services' own cores in one process.
Messages are the contracts' protobuf types; a call that fails raises ``CallFailed`` with its
status code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import TABLE_LACKS_MODEL, Code, RequestError, RetryAdvised

log = logging.getLogger("cachemesh.router")


class CallFailed(RetryAdvised, Exception):
    """A dependency refused or could not serve a call; ``code`` says how. ``reason``: the
    callee's own short account, fit for the client (``RequestError.reason``; "" = none).
    ``retry_after_s``: the whole seconds the callee's upstream asked to be left alone (a model
    replica's ``retry-after`` trailer: its provider's 429 that outlasted the call's deadline).
    ``retried``: the callee had retried its upstream already (a replica's ``cachemesh-retried``
    trailer: its provider retries spent), ``RequestError.retried``. ``backoff_wait``: that
    ``retry_after_s`` is the replica's own backoff, not its provider's ask
    (``RequestError.backoff_wait``). ``mark``: the callee's machine-readable kind of the
    refusal (``RequestError.mark``, its ``cachemesh-mark`` trailer; "" = none): what the router
    acts on, never the message text."""

    def __init__(
        self,
        code: Code,
        details: str,
        reason: str = "",
        *,
        retry_after_s: int | None = None,
        retried: bool = False,
        backoff_wait: bool = False,
        mark: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.retried = retried
        self.backoff_wait = backoff_wait
        self.mark = mark

    @property
    def table_lacks_model(self) -> bool:
        """prefix-cache refused the call for want of a model in its replica's model table
        (``TABLE_LACKS_MODEL``): no fault of the request; a replica with the model takes it."""
        return self.code == Code.FAILED_PRECONDITION and self.mark == TABLE_LACKS_MODEL

    @classmethod
    def of_replica(cls, exc: RequestError) -> CallFailed:
        """A model replica's refusal as the router reads it over gRPC (its status and the
        trailers ``services.model.servicer`` sends: reason, retry-after, retried, where the wait
        came from), for a replica called in process (the offline estimator)."""
        return cls(exc.code, exc.message, exc.reason, **exc.retry_advice())


# ``cachemesh_router_degraded_total``'s reason for a call its request's own (the client's)
# deadline cut short or left no time for: no fault of the dependency, which alerts leave out
CLIENT_DEADLINE = "client_deadline"


class CutByClient(CallFailed):
    """A call that timed out given less than half of the router's own limit for it, the rest
    of that limit cut by its request's own (the client's) deadline: it says little about the
    dependency (``CLIENT_DEADLINE``), and counts toward no breaker."""

    @classmethod
    def of(cls, exc: CallFailed) -> CutByClient:
        cut = cls(exc.code, exc.details, exc.reason, **exc.retry_advice())
        cut.__cause__ = exc
        return cut


class SemanticPort(Protocol):
    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse: ...

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse: ...

    async def release(
        self, request: sc.ReleaseRequest, deadline_s: float
    ) -> sc.ReleaseResponse: ...

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse: ...


class PrefixPort(Protocol):
    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse: ...

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse: ...


def without_refused_report(commit: pc.CommitRequest, exc: CallFailed) -> pc.CommitRequest | None:
    """The FINAL to send in place of ``commit`` when prefix-cache refused it (``exc``:
    INVALID_ARGUMENT) and it carries a provider's report (``provider_usage``): the same
    commit without the report, which prefix-cache bills at its estimate (the WARM's prompt,
    the FINAL's output count); logged at ERROR. None otherwise: the refusal stands. A report
    prefix-cache cannot take (a prompt of 0 tokens, counts that do not add up) never costs
    an answer its bill: before, the refusal was taken for prefix-cache down, the billing
    outbox kept the FINAL, and its replay, refused the same way, dropped it."""
    if exc.code != Code.INVALID_ARGUMENT or not commit.HasField("provider_usage"):
        return None
    log.error(
        "prefix-cache refused the provider's usage report in the FINAL commit %s (%s); "
        "committed again without it, billed at prefix-cache's estimate",
        commit.request_id,
        exc.details,
    )
    again = pc.CommitRequest()
    again.CopyFrom(commit)
    again.ClearField("provider_usage")
    return again


class ModelStream(Protocol):
    """One model call in progress: its chunks in order, ``None`` once it has ended."""

    async def read(self) -> model_pb2.GenerateChunk | None: ...

    def cancel(self) -> None: ...


class ModelPort(Protocol):
    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> ModelStream: ...


@dataclass
class Dependencies:
    """The router's dependencies, and which replicas serve each model."""

    semantic: SemanticPort
    prefix: PrefixPort
    model: ModelPort
    models: Mapping[str, tuple[str, ...]]  # model id -> replica ids (addresses, live)

    def replicas(self, model: str) -> tuple[str, ...]:
        return self.models.get(model, ())
