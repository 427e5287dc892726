"""Which model and replica serve a miss, and the model call up to its first token.

The tier comes from the learned router (``routing``; or the requested model); the replica from
prefix-cache's ranking under SGLang's load rule; a replica that fails before its first token
hands the request to the next one, and for ``auto`` to the other tier.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.common.models import AUTO, ModelSpec, ModelTable
from services.router import spans
from services.router.balance import BalancePolicy, LoadTracker, Route, choose
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies, ModelStream
from services.router.routing.router import Routed

log = logging.getLogger("cachemesh.router")


@dataclass
class Attempt:
    """A model call whose prefill is done: its replica, stream and first report."""

    model: ModelSpec
    tier_reason: str
    replica: str
    stream: ModelStream
    start: model_pb2.GenerateStart
    chat_span: trace.Span
    route: Route
    planned_read: int | None  # the cache read Plan predicted on arrival (None: no Plan)
    plan_id: str  # names the prompt Plan computed, for the WARM commit ("" = none)
    # Each model call is billed under its own id: a retry after a cancelled or failed call is
    # a new provider call, while retries of the same Commit stay idempotent.
    attempt_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def commit_key(self, request_id: str) -> str:
        return f"{request_id}#{self.attempt_id}"


class Dispatcher:
    def __init__(
        self,
        calls: Calls,
        dependencies: Dependencies,
        table: ModelTable,
        tracer: trace.Tracer,
        balance: BalancePolicy,
    ) -> None:
        self._calls = calls
        self._deps = dependencies
        self._table = table
        self._tracer = tracer
        self._balance = balance
        self.loads = LoadTracker()

    async def open(
        self, tenant: str, request: pb.CompleteRequest, routed: Routed | None = None
    ) -> Attempt:
        """Starts the model call on the first replica that answers (prefill done); an
        ``auto`` request goes to ``routed``'s tier first, reusing the Plans it made."""
        plans = routed.plans if routed is not None else {}
        if request.model == AUTO:
            assert routed is not None
            choice = routed.decision
            first = self._table.for_tier(choice.tier)
            other = self._table.for_tier("small" if choice.tier == "large" else "large")
            options = [(first, choice.reason), (other, f"fallback: {first.id} unavailable")]
        else:
            spec = self._table.get(request.model)
            assert spec is not None
            options = [(spec, "requested")]
        failures: list[str] = []
        for spec, reason in options:
            replicas = self._deps.replicas(spec.id)
            if not replicas:
                continue
            plan = (
                plans[spec.id]
                if spec.id in plans
                else await self._calls.plan(tenant, spec.id, request, replicas)
            )
            candidates = (
                [(c.replica, c.warm_prefix_tokens) for c in plan.candidates]
                if plan is not None and plan.candidates
                else [(r, 0) for r in self._deps.rotate(spec.id, replicas)]
            )
            prompt_tokens = plan.prompt_tokens if plan is not None else 0
            route = choose(candidates, self.loads.snapshot(), prompt_tokens, self._balance)
            facts = plan.prompt if plan is not None and plan.HasField("prompt") else None
            for replica in route.order:
                chat_span = spans.start_chat_span(self._tracer, spec.id, replica, spec.provider)
                self.loads.acquire(replica)
                try:
                    with trace.use_span(chat_span, end_on_exit=False):
                        stream, start = await self._calls.generate(
                            tenant, spec.id, request, replica, facts
                        )
                except RequestError:
                    self.loads.release(replica)
                    chat_span.end()
                    raise
                except CallFailed as exc:
                    self.loads.release(replica)
                    spans.record_failure(chat_span, exc)
                    chat_span.end()
                    log.warning("replica %s of %s failed: %s", replica, spec.id, exc.code.name)
                    failures.append(f"{spec.id}: {exc.code.name}")
                    continue
                except BaseException:
                    self.loads.release(replica)
                    chat_span.end()
                    raise
                if replica != route.order[0]:
                    route = Route(route.order, dict(candidates)[replica], "fallback", 0)
                spans.route_attributes(chat_span, replica, route, start)
                planned_read = plan.usage.cache_read_input_tokens if plan is not None else None
                plan_id = plan.plan_id if plan is not None else ""
                return Attempt(
                    spec, reason, replica, stream, start, chat_span, route, planned_read, plan_id
                )
        raise RequestError(
            Code.UNAVAILABLE,
            "no model replica could serve the request ("
            + "; ".join(dict.fromkeys(failures))
            + "); retry later",
        )
