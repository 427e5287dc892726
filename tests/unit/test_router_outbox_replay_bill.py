"""A bill kept while prefix-cache was down is billed by a later replay: what prefix-cache billed
(not the request's estimate, which its trace and access line keep) is on the replay's span, a
child of the request's, and said in one INFO line per settled replay, with the estimate it
replaces: an operator reconciling estimates with bills finds both."""

from __future__ import annotations

import logging

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.common.metrics import TenantLabels, new_registry
from services.router.billing import billed_layer
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from tests.unit.test_router_outbox import _commits
from tests.unit.test_router_outbox_trace import TracedPrefix, _replays, _tracing
from tests.unit.test_router_pipeline import TABLE


class BilledPrefix(TracedPrefix):
    """Bills each FINAL as a cache read of 622,000 nano-dollars."""

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        await super().commit(request, deadline_s)
        if request.phase != pc.COMMIT_PHASE_FINAL:
            return pc.CommitResponse()
        usage = pb.Usage(input_tokens=12, cache_read_input_tokens=4000, output_tokens=30)
        usage.cache_creation_input_tokens = 7
        cost = pb.Cost(cost_nanos=622_000, baseline_nanos=3_880_000, saved_nanos=3_258_000)
        return pc.CommitResponse(usage=usage, cost=cost)


def _layer(model: str, cache_read_tokens: int) -> str:
    return "LAYER_PREFIX_CACHE" if cache_read_tokens >= 1024 else "LAYER_MODEL"


@pytest.mark.parametrize("health", [True, False], ids=["sampled", "unsampled"])
async def test_a_replays_bill_is_on_its_span_and_in_one_info_line(
    health: bool, caplog: pytest.LogCaptureFixture
) -> None:
    tracer, exported = _tracing()
    prefix = BilledPrefix()

    async def serving(deadline_s: float) -> bool:
        return not prefix.down

    outbox = BillingOutbox(
        prefix,
        None,
        1.0,
        0.01,
        tracer,
        prefix_serving=serving if health else None,
        billed_layer=_layer,
    )
    with tracer.start_as_current_span("Complete") as request:
        await outbox.keep(_commits("k#1"), estimate_nanos=3_880_000)
    assert await outbox.flush() == 0  # down: kept
    assert await outbox.flush() == 0  # down again (unsampled without a health to ask)
    prefix.down = False
    caplog.set_level(logging.INFO, logger="cachemesh.router")
    assert await outbox.flush() == 1
    billed = _replays(exported)[-1]
    assert billed.parent is not None
    assert billed.parent.span_id == request.get_span_context().span_id
    attributes = dict(billed.attributes or {})
    assert attributes["cachemesh.outcome"] == "settled"
    assert attributes["cachemesh.cost_nanos"] == 622_000
    assert attributes["cachemesh.baseline_nanos"] == 3_880_000
    assert attributes["cachemesh.saved_nanos"] == 3_258_000
    assert attributes["cachemesh.estimate_nanos"] == 3_880_000
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 4000
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == 7
    assert attributes["cachemesh.billed_layer"] == "LAYER_PREFIX_CACHE"
    (said,) = [r for r in caplog.records if "k#1" in r.getMessage()]
    line = said.getMessage()
    assert "tenant t" in line and "estimated cost_nanos=3880000" in line
    assert "billed cost_nanos=622000" in line and said.levelno == logging.INFO


async def test_a_replay_refused_for_good_writes_no_bill() -> None:
    tracer, exported = _tracing()
    prefix = BilledPrefix()
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, tracer)
    await outbox.keep(_commits("k#2"), estimate_nanos=5)
    prefix.down, prefix.refuse = False, Code.INVALID_ARGUMENT
    assert await outbox.flush() == 0
    (replay,) = _replays(exported)
    assert replay.attributes is not None and "cachemesh.cost_nanos" not in replay.attributes


def test_the_layer_billed_is_the_pipelines_and_none_for_a_model_gone() -> None:
    spec = TABLE.models["sim-large"]
    at_least = spec.min_prefix_hit_tokens
    assert billed_layer(TABLE, "sim-large", at_least) == "LAYER_PREFIX_CACHE"
    assert billed_layer(TABLE, "sim-large", at_least - 1) == "LAYER_MODEL"
    assert billed_layer(TABLE, "no-such-model", at_least) == ""


async def test_a_replays_bill_corrects_the_cost_counters_by_its_difference_either_way() -> None:
    """The cost counters counted each kept bill's estimate; the replay's bill corrects them
    by the difference, by its sign (a counter never decreases): counted cost plus ``up``
    minus ``down`` is what prefix-cache billed."""
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    prefix = BilledPrefix()
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, cost_corrected=metrics.cost_corrected)
    # an estimate at base prices over the bill (a cached prompt priced as input), and one
    # under it (a cache write billed at 1.25x)
    await outbox.keep(_commits("over#1"), estimate_nanos=3_880_000)
    await outbox.keep(_commits("under#1"), estimate_nanos=500_000)
    prefix.down = False
    assert await outbox.flush() == 2

    def corrected(direction: str) -> float | None:
        labels = {"tenant": "t", "direction": direction}
        return registry.get_sample_value("cachemesh_router_cost_corrections_nanos_total", labels)

    assert (corrected("down"), corrected("up")) == (3_258_000, 122_000)
    counted = 3_880_000 + 500_000  # what the pipeline's counters counted as it kept them
    assert counted - 3_258_000 + 122_000 == 2 * 622_000
