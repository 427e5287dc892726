"""An ``auto`` request whose routed tier cannot answer: the response and the request's span say
it fell back to another tier (not only the threshold that chose the first), and a request
whose own ``routing.threshold`` accepts only the large tier's answer is not answered by a
cheaper one (L1 refuses that tier's answer for it: the model call must too). The pipeline
against fakes of its ports (``test_router_pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.router.dependencies import CallFailed, Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeModels,
    FakeStream,
    Rig,
    _settings,
)


def _auto(threshold: float) -> pb.CompleteRequest:
    request = build_request("How do I reset my password?", model="auto", request_id="r1")
    request.routing.threshold = threshold
    return request


async def test_a_fallback_to_another_tier_is_in_the_routing_reason_and_on_the_span() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    rig = Rig()
    rig.models.failing = {"small-1"}  # sim-small unreachable
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(deps, TABLE, TOKENIZER, tracer, _settings(), router, clock=rig.clock)
    with tracer.start_as_current_span("Complete"):
        chunks = [c async for c in pipeline.run("tenant-a", _auto(1.0))]
    await pipeline.drain()
    end = chunks[-1].end
    assert (end.tier, end.model) == ("large", "sim-large")
    # the threshold chose the small tier; its failure is why the large one answered
    assert "< the request's threshold 1.000" in end.routing.reason
    assert "fallback: sim-small unavailable" in end.routing.reason
    (root,) = [s for s in exported.get_finished_spans() if s.name == "Complete"]
    attributes = dict(root.attributes or {})
    assert attributes["cachemesh.routing.reason"] == end.routing.reason
    assert attributes["cachemesh.tier_reason"] == "fallback: sim-small unavailable"


async def test_a_routed_answer_keeps_the_thresholds_reason() -> None:
    rig = Rig()
    end = (await rig.run(_auto(1.0)))[-1].end
    assert end.tier == "small" and "fallback" not in end.routing.reason


async def test_a_request_accepting_only_the_large_tier_is_not_answered_by_a_cheaper_one() -> None:
    """``routing.threshold`` -1 ("the large model, please"), sim-large unreachable: was
    answered by sim-small (billed as a saving, then stored under ``auto`` and served to the
    next request as a hit); now UNAVAILABLE naming the large tier, sim-small not called."""
    rig = Rig()
    rig.models.failing = {"large-1", "large-2"}
    with pytest.raises(RequestError) as caught:
        await rig.run(_auto(-1.0))
    assert caught.value.code == Code.UNAVAILABLE
    message = str(caught.value)
    assert "sim-large: UNAVAILABLE" in message and "accepts only the large tier" in message
    assert sorted(replica for replica, _ in rig.models.calls) == ["large-1", "large-2"]
    assert not rig.semantic.stores


async def test_a_request_whose_threshold_reaches_the_small_tier_still_falls_back_to_it() -> None:
    rig = Rig()
    rig.models.failing = {"large-1", "large-2"}
    end = (await rig.run(_auto(-0.99)))[-1].end  # a score below -0.99 would stay small
    assert end.tier == "small" and "fallback: sim-large unavailable" in end.routing.reason


_TOO_LARGE = (
    "anthropic refused the request (400 invalid_request_error): the prompt is over "
    "claude-haiku-4-5's context window (prompt is too long: 201234 tokens > 200000 maximum)"
)


async def test_a_tier_that_refuses_the_request_as_too_large_hands_it_to_the_next_tier() -> None:
    """The router's count of the prompt is an estimate (Claude's, a local engine's tokenizer):
    a tier's provider may refuse a prompt it let through as over its window, or as alone over
    its account's per-minute tokens (RESOURCE_EXHAUSTED). That ended the ``auto`` request,
    the large tier (another window, another account) never tried; now it answers."""
    rig = Rig()
    rig.models.failing = {"small-1"}
    rig.models.failure = CallFailed(Code.RESOURCE_EXHAUSTED, _TOO_LARGE)
    end = (await rig.run(_auto(1.0)))[-1].end
    assert (end.tier, end.model) == ("large", "sim-large")
    assert "fallback: sim-small refused the request as too large for it" in end.routing.reason
    assert [replica for replica, _ in rig.models.calls] == ["small-1", "large-1"]


async def test_a_request_every_tier_refuses_as_too_large_gets_the_first_refusal() -> None:
    rig = Rig()
    rig.models.failing = {"small-1", "large-1", "large-2"}
    rig.models.failure = CallFailed(Code.RESOURCE_EXHAUSTED, _TOO_LARGE)
    with pytest.raises(RequestError) as caught:
        await rig.run(_auto(1.0))
    assert caught.value.code == Code.RESOURCE_EXHAUSTED and str(caught.value) == _TOO_LARGE
    assert [replica for replica, _ in rig.models.calls] == ["small-1", "large-1"]


@pytest.mark.parametrize(
    ("model", "code"),
    [("auto", Code.INVALID_ARGUMENT), ("sim-small", Code.RESOURCE_EXHAUSTED)],
)
async def test_other_refusals_and_a_named_models_end_the_request(model: str, code: Code) -> None:
    rig = Rig()
    rig.models.failing = {"small-1"}
    rig.models.failure = CallFailed(code, "refused")
    request = _auto(1.0) if model == "auto" else build_request("Hi", model=model)
    with pytest.raises(RequestError) as caught:
        await rig.run(request)
    assert caught.value.code == code
    assert [replica for replica, _ in rig.models.calls] == ["small-1"]


@dataclass
class _OutageAfterTooLarge(FakeModels):
    """sim-small's replica refuses the request as too large; sim-large's are overloaded (a
    transient failure, with the provider's wait)."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        if replica.startswith("large"):
            self.calls.append((replica, request))
            overloaded = CallFailed(
                Code.UNAVAILABLE, "overloaded", reason="overloaded_error (529)", retry_after_s=7
            )
            return FakeStream([overloaded])
        return super().generate(replica, request, deadline_s)


async def test_a_later_tiers_outage_after_a_too_large_refusal_is_the_requests_failure() -> None:
    """The small tier refused the request as too large, the large one (which may hold it)
    failed for now: the caller was told the small tier's too-large refusal (a 400 the SDKs
    never retry, naming only the small tier; the large tier's outage and wait dropped). Now
    the usual transient failure, with its wait, naming both."""
    models = _OutageAfterTooLarge(failing={"small-1"})
    models.failure = CallFailed(Code.RESOURCE_EXHAUSTED, _TOO_LARGE)
    rig = Rig(models=models)
    with pytest.raises(RequestError) as caught:
        await rig.run(_auto(1.0))
    assert [replica for replica, _ in rig.models.calls] == ["small-1", "large-1", "large-2"]
    assert caught.value.code == Code.UNAVAILABLE
    assert caught.value.retry_after_s == 7
    message = str(caught.value)
    assert "sim-large: UNAVAILABLE (overloaded_error (529))" in message
    assert f"sim-small: RESOURCE_EXHAUSTED ({_TOO_LARGE})" in message


@dataclass
class _TooLargeAfterOutage(FakeModels):
    """sim-small's replica is overloaded (a transient failure, with the provider's wait);
    sim-large's refuse the request as too large for them."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        if replica.startswith("small"):
            overloaded = CallFailed(
                Code.UNAVAILABLE, "overloaded", reason="overloaded_error (529)", retry_after_s=7
            )
            return FakeStream([overloaded])
        return FakeStream([CallFailed(Code.RESOURCE_EXHAUSTED, _TOO_LARGE)])


async def test_an_earlier_tiers_outage_before_a_too_large_refusal_is_the_requests_failure() -> None:
    """The small tier (which may hold the prompt) failed for now, then the large one refused
    the request as too large: the caller was told the large tier's too-large refusal (a 400
    the SDKs never retry, the small tier's outage and wait dropped), though a retry may be
    answered by the small tier once it is back. Now the usual transient failure, with its wait,
    naming both (as when the tiers fail the other way round)."""
    rig = Rig(models=_TooLargeAfterOutage())
    with pytest.raises(RequestError) as caught:
        await rig.run(_auto(1.0))
    assert rig.models.calls[0][0] == "small-1"
    assert {replica for replica, _ in rig.models.calls} >= {"small-1", "large-1"}
    assert caught.value.code == Code.UNAVAILABLE
    assert caught.value.retry_after_s == 7
    message = str(caught.value)
    assert "sim-small: UNAVAILABLE (overloaded_error (529))" in message
    assert f"sim-large: RESOURCE_EXHAUSTED ({_TOO_LARGE})" in message
