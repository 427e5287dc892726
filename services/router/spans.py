"""What the router writes on spans: the root span's outcome and the GenAI model-call span."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import RequestError
from services.router.balance import Route
from services.router.dependencies import CallFailed
from services.router.routing.decision import Decision


def request_attributes(span: trace.Span, tenant: str, request: pb.CompleteRequest) -> None:
    if span.is_recording():
        span.set_attributes(
            {
                "cachemesh.tenant": tenant,
                "cachemesh.request_id": request.request_id,
                "cachemesh.requested_model": request.model,
            }
        )


def replay_attributes(span: trace.Span, first: pb.CompleteResponse) -> None:
    """A retry served the first call's answer (its tenant and request are on the span since
    it was accepted): which answer, and a link to the span that produced (and billed) it. No
    cost attributes: the bill is on that span, once."""
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "cachemesh.replayed": True,
            "cachemesh.served_by": pb.Layer.Name(first.served_by),
            "cachemesh.model": first.model,
            "cachemesh.tier": first.tier,
        }
    )
    linked = _span_context(first.trace_id, first.span_id)
    if linked is not None:
        span.add_link(linked, {"cachemesh.link": "replayed_from"})


def _span_context(trace_id: str, span_id: str) -> trace.SpanContext | None:
    """The first call's span, from the answer's hex ids. An answer recorded before it carried
    its span id links the trace alone (span id 0, which the link's attribute keeps valid)."""
    try:
        trace_int = int(trace_id, 16) if len(trace_id) == 32 else 0
        span_int = int(span_id, 16) if len(span_id) == 16 else 0
    except ValueError:
        return None
    if not trace_int:
        return None
    return trace.SpanContext(trace_int, span_int, is_remote=True)


def outcome_attributes(span: trace.Span, response: pb.CompleteResponse) -> None:
    if not span.is_recording():  # untraced: not even the reads
        return
    cost = response.cost
    attributes: dict[str, AttributeValue] = {
        "cachemesh.served_by": pb.Layer.Name(response.served_by),
        "cachemesh.model": response.model,
        "cachemesh.tier": response.tier,
        "cachemesh.cost_nanos": cost.cost_nanos,
        "cachemesh.baseline_nanos": cost.baseline_nanos,
        "cachemesh.saved_nanos": cost.saved_nanos,
        "cachemesh.cost_estimated": cost.estimated,
    }
    if response.served_by == pb.LAYER_SEMANTIC_CACHE:
        attributes["cachemesh.similarity"] = response.semantic.similarity
        attributes["cachemesh.semantic_exact"] = response.semantic.exact
    span.set_attributes(attributes)  # one call: each set_attribute takes the span's lock


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
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_NAMES.get(provider, provider),
        "gen_ai.request.model": model,
        "cachemesh.replica": replica,
    }
    return tracer.start_span(f"chat {model}", kind=trace.SpanKind.CLIENT, attributes=attributes)


def end_chat_span(span: trace.Span, request: pb.CompleteRequest, end: pb.CompleteResponse) -> None:
    if not span.is_recording():
        return
    usage = end.usage
    span.set_attributes(
        {
            "gen_ai.request.max_tokens": request.max_tokens,
            "gen_ai.response.model": end.model,
            "gen_ai.response.finish_reasons": [end.stop_reason],
            **_billed(usage, end.cost),
            "cachemesh.kv_cached_tokens": usage.kv_cached_tokens,
            "cachemesh.draft_accepted_tokens": usage.draft_accepted_tokens,
        }
    )


def chat_billed(
    span: trace.Span, request: pb.CompleteRequest, usage: pb.Usage, cost: pb.Cost
) -> None:
    """A model call billed without its answer (cancelled, cut, outlasted): its bill, known
    only after the call ended (its FINAL), on its span, which is held open for it."""
    if span.is_recording():
        span.set_attributes(
            {"gen_ai.request.max_tokens": request.max_tokens, **_billed(usage, cost)}
        )


def replay_billed(
    span: trace.Span, reply: pc.CommitResponse, estimate_nanos: int | None, layer: str | None
) -> None:
    """A bill kept while prefix-cache was down, billed by a replay: on the replay's span (a
    child of the request's, whose own span and access line keep the estimate,
    ``estimate_nanos``) what it was billed, and the layer it is served by."""
    if not span.is_recording():
        return
    attributes = _billed(reply.usage, reply.cost)
    if estimate_nanos is not None:
        attributes["cachemesh.estimate_nanos"] = estimate_nanos
    if layer:
        attributes["cachemesh.billed_layer"] = layer
    attributes["cachemesh.billed_before"] = reply.repeated
    span.set_attributes(attributes)


def _billed(usage: pb.Usage, cost: pb.Cost) -> dict[str, AttributeValue]:
    """A model call's usage (the GenAI conventions' names) and what it was billed. The
    conventions' ``input_tokens`` is the whole prompt, cached tokens included (as the model
    service's span and ``gen_ai_client_token_usage`` count it); ``usage.input_tokens``, the
    part read or written by no cache (Anthropic's meaning), is ``uncached_input_tokens``."""
    prompt = usage.input_tokens + usage.cache_read_input_tokens
    prompt += usage.cache_creation_input_tokens
    return {
        "gen_ai.usage.input_tokens": prompt,
        "cachemesh.usage.uncached_input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read_input_tokens,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation_input_tokens,
        "cachemesh.cost_nanos": cost.cost_nanos,
        "cachemesh.baseline_nanos": cost.baseline_nanos,
        "cachemesh.saved_nanos": cost.saved_nanos,
        "cachemesh.cost_estimated": cost.estimated,
    }


class UnansweredBills:
    """The bills of a request's model calls that ended without their answer, summed on the
    request's span (``cachemesh.unanswered_cost_nanos``): a cut call's, known while another
    replica answers, and one known after the call ended (a caller that left), for which the
    Gateway's span waits (``rpc_tracing.end_after``)."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._cost_nanos = 0

    def add(self, cost_nanos: int) -> None:
        self._cost_nanos += cost_nanos
        if self._span.is_recording():
            self._span.set_attribute("cachemesh.unanswered_cost_nanos", self._cost_nanos)


def chat_failed(span: trace.Span, error_type: str) -> None:
    """A model call that ended without its answer (cut, outlasted, failed): ERROR with its
    ``error.type`` (the GenAI metrics' label). A caller's cancel is no error: not marked."""
    if error_type == "cancelled" or not span.is_recording():
        return
    span.set_status(trace.Status(trace.StatusCode.ERROR, error_type))
    span.set_attribute("error.type", error_type)


def chat_refused(span: trace.Span, exc: RequestError) -> None:
    """A model call its replica refused as the request's fault (``calls.CLIENT_FAULTS``: a
    provider's 400-class, a prompt over the context window): its ``error.type`` is the gRPC
    status name, its status stays UNSET, as the HTTP front leaves a 4xx (a server span is an
    ERROR for the server's failures only): dashboards count no server error for it."""
    span.set_attribute("error.type", exc.code.name)


def record_failure(span: trace.Span, exc: CallFailed | RequestError) -> None:
    """A model call that failed for its replica's fault (not the request's): an ERROR with
    its gRPC status name as ``error.type``."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code.name))
    span.set_attribute("error.type", exc.code.name)


def route_attributes(
    span: trace.Span, replica: str, route: Route, start: model_pb2.GenerateStart
) -> None:
    """L3: the chosen replica, why, its predicted warm prefix and what it really reused."""
    if not span.is_recording():
        return
    route_decision(span, route)
    span.set_attributes(
        {
            "cachemesh.replica": replica,
            "cachemesh.backend": start.backend or "simulated",
            "cachemesh.kv_cached_tokens": start.kv_cached_tokens,
        }
    )


def route_decision(span: trace.Span, route: Route) -> None:
    """L3: why the call's replica was chosen (reason, predicted warm prefix, load, TTFT and
    queue), set when the call is sent, so that a call that ends before its first report (a
    stall handed over, a refusal) names it too."""
    if not span.is_recording():
        return
    attributes: dict[str, AttributeValue] = {
        "cachemesh.route_reason": route.reason,
        "cachemesh.kv_match_tokens": route.match_tokens,
        "cachemesh.replica_load": route.load,
    }
    if route.predicted_ttft_s is not None:
        attributes["cachemesh.predicted_ttft_ms"] = round(route.predicted_ttft_s * 1000, 3)
    if route.queued_s is not None:
        attributes["cachemesh.replica_queued_ms"] = round(route.queued_s * 1000, 3)
    if route.ejected:  # left out of the choice for their failures (replica_health)
        attributes["cachemesh.replicas_ejected"] = list(route.ejected)
    if route.probe:
        attributes["cachemesh.replica_probe"] = True
    span.set_attributes(attributes)


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
