"""More than two tiers: the model table's order by price, the score bands, the cost-aware rule
over them, the tier router planning every tier, and the fallback order (fakes, no gRPC)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.env import ConfigError, Env
from services.common.model_overrides import model_table_from_env
from services.common.models import ModelSpec, ModelTable, load_model_table
from services.router.dispatch import fallback_tiers
from services.router.metrics import decision_reason
from services.router.routing.bands import Band, bands, decide_bands, price_position
from services.router.routing.decision import decide, tier_cost
from services.router.routing.model import load_router_model
from services.router.routing.router import FROM_LOOKUP, TierRouter
from services.router.settings import parse_tier_thresholds

TWO = load_model_table()


def _medium(input_nanos: int = 2000, output_nanos: int = 10000) -> ModelSpec:
    return TWO.models["sim-small"].model_copy(
        update={
            "id": "sim-medium",
            "tier": "medium",
            "input_nanos": input_nanos,
            "output_nanos": output_nanos,
            "cache_write_5m_nanos": input_nanos * 5 // 4,
            "cache_read_nanos": input_nanos // 10,
        }
    )


def three(medium: ModelSpec | None = None) -> ModelTable:
    return ModelTable(
        models={**TWO.models, "sim-medium": medium or _medium()},
        auto={"large": "sim-large", "medium": "sim-medium", "small": "sim-small"},
    )


THREE = three()
NAMES = ["small", "medium", "large"]
SPECS = [THREE.for_tier(t) for t in THREE.tiers]


def test_the_tiers_are_ordered_by_price_with_two_by_default() -> None:
    assert TWO.tiers == ("small", "large")
    assert THREE.tiers == ("small", "medium", "large")  # whatever order [auto] names them
    with pytest.raises(ValueError, match="ordered by price"):
        three(_medium(4000, 20000))  # priced above the large tier
    with pytest.raises(ValueError, match="names large"):
        ModelTable(models=THREE.models, auto={"small": "sim-small", "medium": "sim-medium"})
    with pytest.raises(ValueError, match="not a medium-tier model"):
        ModelTable(models=THREE.models, auto={**THREE.auto, "medium": "sim-small"})


def test_auto_tiers_from_the_environment(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "services/common/models.toml").read_text()
    medium = """
[models.sim-medium]
tier = "medium"
provider = "simulated"
rules = "anthropic"
source = "a test row between sim-small and sim-large"
input_nanos = 2000
output_nanos = 10000
cache_write_5m_nanos = 2500
cache_write_1h_nanos = 4000
cache_read_nanos = 200
min_cacheable_tokens = 1024
context_window_tokens = 200000
max_output_tokens = 64000
prefill_tokens_per_s = 8000.0
decode_tokens_per_s = 120.0
"""
    path = tmp_path / "models.toml"
    path.write_text(text.replace("[auto]", medium + "\n[auto]"))
    base = {"CACHEMESH_MODELS_FILE": str(path)}
    assert model_table_from_env(Env(base)).tiers == ("small", "large")  # not in auto: unused
    table = model_table_from_env(Env({**base, "CACHEMESH_AUTO_TIERS": "medium=sim-medium"}))
    assert table.tiers == ("small", "medium", "large")
    with pytest.raises(ConfigError, match="CACHEMESH_AUTO_TIERS"):
        model_table_from_env(Env({**base, "CACHEMESH_AUTO_TIERS": "medium"}))
    with pytest.raises(ConfigError, match="not a medium-tier model"):
        model_table_from_env(Env({**base, "CACHEMESH_AUTO_TIERS": "medium=sim-large"}))


def test_tier_thresholds_are_validated_naming_the_variable() -> None:
    assert parse_tier_thresholds(Env({"ROUTER_TIER_THRESHOLDS": "medium=0.05"}), THREE) == {
        "medium": 0.05
    }
    assert parse_tier_thresholds(Env({}), THREE) == {}
    for bad in ("large=0.1", "medium=2", "medium=", "huge=0.1", "medium=x"):
        with pytest.raises(ConfigError, match="ROUTER_TIER_THRESHOLDS"):
            parse_tier_thresholds(Env({"ROUTER_TIER_THRESHOLDS": bad}), THREE)
    with pytest.raises(ConfigError, match="two tiers"):
        parse_tier_thresholds(Env({"ROUTER_TIER_THRESHOLDS": "medium=0.1"}), TWO)


def test_a_middle_threshold_is_derived_from_the_largest_by_price_or_configured() -> None:
    small, medium, large = SPECS
    assert price_position(small, medium, large) == pytest.approx(0.5)
    derived = bands(SPECS, 0.12, {})
    assert [(b.tier, b.source) for b in derived] == [("medium", "derived"), ("large", "configured")]
    assert [b.threshold for b in derived] == pytest.approx([0.06, 0.12])
    assert [b.threshold for b in bands(SPECS, 0.12, {"medium": 0.02})] == pytest.approx(
        [0.02, 0.12]
    )
    capped = bands(SPECS, 0.12, {"medium": 0.5}, requested=True)  # above large's: empty band
    assert [b.threshold for b in capped] == pytest.approx([0.12, 0.12])
    assert capped[-1].source == "the request's"


@pytest.mark.parametrize(("score", "tier"), [(0.01, "small"), (0.07, "medium"), (0.3, "large")])
def test_the_score_falls_in_one_band_and_the_reason_names_it(score: float, tier: str) -> None:
    decision = decide_bands(score, NAMES, bands(SPECS, 0.12, {}), FROM_LOOKUP)
    assert decision.tier == tier
    assert f"in the {tier} band" in decision.reason and "medium 0.060 (derived)" in decision.reason
    assert decision.base_threshold == pytest.approx(0.12)
    held = {"small": 0.06, "medium": 0.06, "large": 0.12}[tier]
    assert decision.threshold == pytest.approx(held)


@pytest.mark.parametrize("score", [-0.3, 0.01, 0.07, 0.3])
def test_a_band_decision_is_labelled_threshold_unless_the_costs_moved_it(score: float) -> None:
    """The decisions metric's reason: a small or medium tier's band edge is not the large
    tier's threshold, and that is no sign the costs moved anything (cost-aware off, or cold)."""
    cuts = bands(SPECS, 0.12, {})
    for costs in (None, _costs({})):
        decision = decide_bands(score, NAMES, cuts, "x", costs)  # type: ignore[arg-type]
        assert decision_reason(decision.reason, decision) == "threshold", decision.reason
        assert not decision.moved_by_costs
    moved = decide_bands(0.02, NAMES, cuts, "x", _costs({"medium": 2900}))  # type: ignore[arg-type]
    assert decision_reason(moved.reason, moved) == "cost_aware" and moved.moved_by_costs
    small, large = (tier_cost(TWO.for_tier(t), 100, 0, 2900, 100) for t in TWO.tiers)
    assert decide(score, 0.12, "x", small, large).moved_by_costs  # both warm: extra price less
    assert not decide(score, 0.12, "x").moved_by_costs


def test_two_tiers_decide_as_before() -> None:
    small, large = (tier_cost(TWO.for_tier(t), 100, 0, 2900, 100) for t in TWO.tiers)
    specs = [TWO.for_tier(t) for t in TWO.tiers]
    for score in (-0.5, 0.05, 0.12, 0.3):
        for costs in (None, (small, large)):
            got = decide_bands(score, ["small", "large"], bands(specs, 0.12, {}), "x", costs)
            assert got == decide(score, 0.12, "x", *(costs or (None, None)))


def _costs(warm: dict[str, int], prompt: int = 3000) -> list[object]:
    return [
        tier_cost(spec, prompt - warm.get(spec.tier, 0), 0, warm.get(spec.tier, 0), 100)
        for spec in SPECS
    ]


def test_cold_costs_keep_the_bands() -> None:
    cuts = bands(SPECS, 0.12, {})
    for score in (0.01, 0.07, 0.3):
        plain = decide_bands(score, NAMES, cuts, "x")
        weighed = decide_bands(score, NAMES, cuts, "x", _costs({}))  # type: ignore[arg-type]
        assert weighed.tier == plain.tier and weighed.threshold == pytest.approx(plain.threshold)
        assert "with the costs now" not in weighed.reason


def test_a_conversation_warm_on_the_medium_tier_stays_there() -> None:
    cuts = bands(SPECS, 0.12, {})
    costs = _costs({"medium": 2900})
    low = decide_bands(0.02, NAMES, cuts, "x", costs)  # type: ignore[arg-type]
    high = decide_bands(0.15, NAMES, cuts, "x", costs)  # type: ignore[arg-type]
    assert (low.tier, high.tier) == ("medium", "medium")  # cold: small and large
    assert "kept on the medium tier" in low.reason and "2900 tokens warm" in low.reason
    assert high.threshold < 0.15  # the band's edges moved up around the warm tier
    leave = decide_bands(0.9, NAMES, cuts, "x", costs)  # type: ignore[arg-type]
    assert leave.tier == "large" and "leaving the warm medium tier" in leave.reason


def test_a_warm_large_tier_takes_the_medium_band_and_thresholds_at_or_below_0_are_not_moved() -> (
    None
):
    cuts = bands(SPECS, 0.12, {})
    costs = _costs({"large": 2900})
    assert decide_bands(0.07, NAMES, cuts, "x", costs).tier == "large"  # type: ignore[arg-type]
    flat = [Band("medium", -0.1, "configured"), Band("large", 0.12, "configured")]
    unmoved = decide_bands(0.07, NAMES, flat, "x", costs)  # type: ignore[arg-type]
    assert unmoved.tier == "medium" and "costs now" in unmoved.reason


def test_fallbacks_go_to_the_nearest_tier_dearer_first() -> None:
    tiers = ("small", "medium", "large")
    assert fallback_tiers(tiers, "medium") == ["large", "small"]
    assert fallback_tiers(tiers, "large") == ["medium", "small"]
    assert fallback_tiers(tiers, "small") == ["medium", "large"]
    assert fallback_tiers(("small", "large"), "large") == ["small"]


@dataclass
class FakePlans:
    """Plans whose cache read is the tier's warm prefix; records the models planned."""

    warm: dict[str, int] = field(default_factory=dict)
    planned: list[str] = field(default_factory=list)

    def replicas(self, model: str) -> tuple[str, ...]:
        return (f"{model}-1",)

    async def plan(
        self,
        tenant: str,
        model: str,
        request: pb.CompleteRequest,
        replicas: tuple[str, ...],
        window: object = None,
    ) -> pc.PlanResponse:
        self.planned.append(model)
        read = self.warm.get(model, 0)
        usage = pb.Usage(input_tokens=3000 - read, cache_read_input_tokens=read)
        return pc.PlanResponse(prompt_tokens=3000, usage=usage, plan_id=f"plan-{model}")


def _router(plans: FakePlans, cost_aware: bool = True) -> TierRouter:
    model = load_router_model()
    return TierRouter(model, 0.12, THREE, plans, plans, None, cost_aware)  # type: ignore[arg-type]


def test_the_router_plans_every_tier_of_a_conversation_and_keeps_it_where_it_is_warm() -> None:
    plans = FakePlans(warm={"sim-medium": 2900})
    request = build_request("And a 30 kg one?", model="auto")
    request.system.append(pb.ContentBlock(text="Support desk rules."))
    request.routing.threshold = 0.9  # alone, no question reaches the large tier
    routed = asyncio.run(_router(plans).route("tenant-a", request, None))
    assert sorted(plans.planned) == ["sim-large", "sim-medium", "sim-small"]
    assert set(routed.plans) == {"sim-small", "sim-medium", "sim-large"}
    assert routed.decision.tier == "medium", routed.decision.reason
    assert "kept on the medium tier" in routed.decision.reason
    assert routed.decision.base_threshold == pytest.approx(0.9)


def test_a_single_question_is_not_planned_and_the_plain_rule_plans_nothing() -> None:
    plans = FakePlans()
    question = build_request("What is 2 + 2?", model="auto")
    routed = asyncio.run(_router(plans).route("tenant-a", question, None))
    assert not plans.planned and not routed.plans
    assert routed.decision.tier in NAMES and "band" in routed.decision.reason
    conversation = build_request("And a 30 kg one?", model="auto")
    conversation.system.append(pb.ContentBlock(text="Support desk rules."))
    asyncio.run(_router(plans, cost_aware=False).route("tenant-a", conversation, None))
    assert not plans.planned


def test_the_lowest_tier_a_request_allows_is_the_lowest_scores() -> None:
    """What an auto request's L1 hit must reach (the pipeline refuses one below it)."""
    request = build_request("What is 2 + 2?", model="auto")
    assert _router(FakePlans()).lowest_tier(request) == "small"
    request.routing.threshold = -0.99  # a score below it stays small
    assert _router(FakePlans()).lowest_tier(request) == "small"
    request.routing.threshold = -1.0  # every score reaches the large tier
    assert _router(FakePlans()).lowest_tier(request) == "large"
    model = load_router_model()
    floor = TierRouter(model, 0.12, THREE, None, None, None, tier_thresholds={"medium": -1.0})  # type: ignore[arg-type]
    assert floor.lowest_tier(build_request("What is 2 + 2?", model="auto")) == "medium"


def test_calibrating_a_middle_tier_for_a_share_of_calls() -> None:
    import numpy as np

    from services.tools.evaluation.router.session import Prompts
    from services.tools.evaluation.router.tiers import (
        TierShareError,
        calibrate_tiers,
        parse_tier_shares,
    )

    n = 100
    scores = np.linspace(-0.2, 0.79, n)  # ascending
    weak = np.arange(n) % 2 == 0
    strong = np.ones(n, dtype=bool)
    tokens = np.full(n, 100.0)
    empty = np.zeros((n, 1), np.float32)
    prompts = Prompts([], empty, empty, weak, strong, tokens, tokens, tokens)
    shares = parse_tier_shares("medium=0.5", THREE)
    result = calibrate_tiers(prompts, scores, THREE, 0.6, shares)
    assert result["shares"] == {"small": 0.5, "medium": 0.3, "large": 0.2}
    thresholds = result["thresholds"]
    assert isinstance(thresholds, dict) and thresholds["large"] == 0.6
    assert result["quality_low"] == pytest.approx(0.2 + 0.8 * 0.5)  # the rest answered as small
    assert result["quality_high"] == pytest.approx(0.5 * 0.5 + 0.5)  # medium answered as large
    for bad in ("large=0.2", "medium=1.5", "medium"):
        with pytest.raises(TierShareError, match="--tier-share"):
            parse_tier_shares(bad, THREE)


def test_amortized_writes_are_priced_as_shared_with_the_next_turns_reads() -> None:
    small = TWO.for_tier("small")  # write 1250, read 100 nanos a token
    assert tier_cost(small, 0, 1000, 0, 0).nanos == 1_250_000
    assert tier_cost(small, 0, 1000, 0, 0, amortize=4).nanos == 1000 * (1250 + 4 * 100) // 5
    assert tier_cost(small, 0, 1000, 0, 0, amortize=4).cold_nanos == 1_000_000  # unchanged


def test_a_tier_cost_over_a_long_context_threshold_is_at_the_long_context_rates() -> None:
    gpt = TWO.models["gpt-5-4"]  # more than 272,000 prompt tokens: 2x input and read, 1.5x out
    assert (
        tier_cost(gpt, 72_000, 0, 200_000, 100).nanos == 72_000 * 2500 + 200_000 * 250 + 100 * 15000
    )
    over = tier_cost(gpt, 72_001, 0, 200_000, 100)
    assert over.nanos == 72_001 * 5000 + 200_000 * 500 + 100 * 22500
    assert over.cold_nanos == 272_001 * 5000 + 100 * 22500


def test_the_rows_a_request_may_be_answered_by() -> None:
    """``auto``: each tier's row, cheapest first whatever the order ``[auto]`` names them in
    (the validation's messages name the first); a model: its own row."""
    assert [spec.id for spec in THREE.answering("auto")] == ["sim-small", "sim-medium", "sim-large"]
    assert THREE.answering("sim-large") == (THREE.models["sim-large"],)
