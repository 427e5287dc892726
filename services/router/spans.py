"""What the router writes on spans: the root span's outcome and the GenAI model-call span."""

from __future__ import annotations

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.router.balance import Route
from services.router.dependencies import CallFailed
from services.router.routing.decision import Decision


def request_attributes(span: trace.Span, tenant: str, request: pb.CompleteRequest) -> None:
    span.set_attribute("cachemesh.tenant", tenant)
    span.set_attribute("cachemesh.request_id", request.request_id)
    span.set_attribute("cachemesh.requested_model", request.model)


def outcome_attributes(span: trace.Span, response: pb.CompleteResponse) -> None:
    span.set_attribute("cachemesh.served_by", pb.Layer.Name(response.served_by))
    span.set_attribute("cachemesh.model", response.model)
    span.set_attribute("cachemesh.tier", response.tier)
    span.set_attribute("cachemesh.cost_nanos", response.cost.cost_nanos)
    span.set_attribute("cachemesh.baseline_nanos", response.cost.baseline_nanos)
    span.set_attribute("cachemesh.saved_nanos", response.cost.saved_nanos)
    span.set_attribute("cachemesh.cost_estimated", response.cost.estimated)
    if response.served_by == pb.LAYER_SEMANTIC_CACHE:
        span.set_attribute("cachemesh.similarity", response.semantic.similarity)
        span.set_attribute("cachemesh.semantic_exact", response.semantic.exact)


# the table's provider -> gen_ai.provider.name (OpenTelemetry GenAI conventions)
PROVIDER_NAMES = {
    "simulated": "cachemesh.simulated",
    "anthropic": "anthropic",
    "openai": "openai",
    "self_hosted": "cachemesh.self_hosted",
}


def start_chat_span(
    tracer: trace.Tracer, model: str, replica: str, provider: str = "simulated"
) -> trace.Span:
    """The model call, named and attributed by the OpenTelemetry GenAI conventions."""
    span = tracer.start_span(f"chat {model}", kind=trace.SpanKind.CLIENT)
    span.set_attribute("gen_ai.operation.name", "chat")
    span.set_attribute("gen_ai.provider.name", PROVIDER_NAMES.get(provider, provider))
    span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("cachemesh.replica", replica)
    return span


def end_chat_span(span: trace.Span, request: pb.CompleteRequest, end: pb.CompleteResponse) -> None:
    usage = end.usage
    span.set_attribute("gen_ai.request.max_tokens", request.max_tokens)
    span.set_attribute("gen_ai.response.model", end.model)
    span.set_attribute("gen_ai.response.finish_reasons", [end.stop_reason])
    span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cache_read_input_tokens)
    span.set_attribute(
        "gen_ai.usage.cache_creation.input_tokens", usage.cache_creation_input_tokens
    )
    span.set_attribute("cachemesh.kv_cached_tokens", usage.kv_cached_tokens)
    span.set_attribute("cachemesh.draft_accepted_tokens", usage.draft_accepted_tokens)


def record_failure(span: trace.Span, exc: CallFailed) -> None:
    span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code.name))
    span.set_attribute("error.type", exc.code.name)


def route_attributes(
    span: trace.Span, replica: str, route: Route, start: model_pb2.GenerateStart
) -> None:
    """L3: the chosen replica, why, its predicted warm prefix and what it really reused."""
    span.set_attribute("cachemesh.replica", replica)
    span.set_attribute("cachemesh.backend", start.backend or "simulated")
    span.set_attribute("cachemesh.route_reason", route.reason)
    span.set_attribute("cachemesh.kv_match_tokens", route.match_tokens)
    span.set_attribute("cachemesh.replica_load", route.load)
    if route.predicted_ttft_s is not None:
        span.set_attribute("cachemesh.predicted_ttft_ms", round(route.predicted_ttft_s * 1000, 3))
    if route.queued_s is not None:
        span.set_attribute("cachemesh.replica_queued_ms", round(route.queued_s * 1000, 3))
    span.set_attribute("cachemesh.kv_cached_tokens", start.kv_cached_tokens)


def first_token(root: trace.Span, chat: trace.Span, seconds: float) -> None:
    """Time to first token: from the request's arrival at the pipeline to the first content
    the model sent (after the L1 lookup, the plan and the provider's prefill)."""
    root.set_attribute("cachemesh.ttft_ms", round(seconds * 1000, 3))
    chat.set_attribute("gen_ai.server.time_to_first_token", seconds)


def reconciled(span: trace.Span, final: pc.CommitResponse) -> None:
    """Whether the provider's usage was the bill, and its drift from prefix-cache's estimate."""
    span.set_attribute("cachemesh.usage_reported", final.reconciled)
    if final.reconciled:
        span.set_attribute("cachemesh.drift.prompt_tokens", final.drift.prompt_tokens)
        span.set_attribute("cachemesh.drift.input_tokens", final.drift.input_tokens)
        span.set_attribute(
            "cachemesh.drift.cache_read_input_tokens", final.drift.cache_read_input_tokens
        )
        span.set_attribute(
            "cachemesh.drift.cache_creation_input_tokens",
            final.drift.cache_creation_input_tokens,
        )
        span.set_attribute("cachemesh.drift.cost_nanos", final.drift.cost_nanos)


def routing(span: trace.Span, decision: Decision) -> pb.Routing:
    """The tier router's score, threshold and reason: on the root span and the response."""
    span.set_attribute("cachemesh.routing.score", round(decision.score, 6))
    span.set_attribute("cachemesh.routing.threshold", round(decision.threshold, 6))
    span.set_attribute("cachemesh.routing.base_threshold", round(decision.base_threshold, 6))
    span.set_attribute("cachemesh.routing.reason", decision.reason)
    span.set_attribute("cachemesh.routing.embedding_source", decision.embedding_source)
    return pb.Routing(
        score=decision.score,
        threshold=decision.threshold,
        reason=decision.reason,
        embedding_source=decision.embedding_source,
        base_threshold=decision.base_threshold,
    )
