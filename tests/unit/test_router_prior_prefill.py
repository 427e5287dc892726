"""A model row's own prior prefill rate: what the TTFT replica policy assumes of a replica of a
slow self-hosted engine before it has measured it (the router's global prior, meant for hosted
providers, stays the fallback)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.env import ConfigError, Env
from services.common.model_overrides import model_table_from_env
from services.common.models import ModelSpec, load_model_table
from services.router.replica_choice import ChoiceSettings, ReplicaChooser, Request, TtftPolicy
from services.router.replica_state import ReplicaStates

GLOBAL_PRIOR = 10_000.0  # ROUTER_TTFT_PRIOR_PREFILL_TPS's default
ENGINE_TPS = 150.0  # SmolLM2-135M on one thread here


def _conversation_turn(spec: ModelSpec) -> str:
    """Replica ``a`` holds 1,008 tokens of a 1,200-token prompt and has been measured at the
    engine's real 150 tokens/s; replica ``b`` (the same engine) has not reported yet. Where
    does the next turn go?"""
    chooser = ReplicaChooser(
        ChoiceSettings(ttft=TtftPolicy(prior_prefill_tps=GLOBAL_PRIOR)), ReplicaStates()
    )
    ticket = chooser.states.sent("a", 1_500, 1_500, [], now=0.0)
    chooser.states.started("a", ticket, 1_500, 0, now=1_500 / ENGINE_TPS)
    chooser.states.release("a")
    wanted = Request(spec.id, 1_200, [], spec.prior_prefill_rate)
    return chooser.choose(wanted, ["a", "b"], {"a": 1_008}, now=100.0).order[0]


def test_a_row_prior_keeps_a_conversation_on_its_warm_replica() -> None:
    table = load_model_table()
    plain = table.models["local-small"]
    assert plain.prior_prefill_rate is None  # the packaged row leaves it to the operator
    # with the global prior, the unmeasured replica looks 66x faster: 1,200 / 10,000 = 0.12 s
    # against a's 192 / 150 = 1.28 s, and the turn leaves its prefix (b really takes 8 s)
    assert _conversation_turn(plain) == "b"
    slow = model_table_from_env(Env({"CACHEMESH_PRIOR_PREFILL_TPS": "local-small=150"}))
    row = slow.models["local-small"]
    assert row.prior_prefill_rate == ENGINE_TPS
    assert _conversation_turn(row) == "a"  # b at the row's 150/s: 8 s; a stays
    # only the named row changes
    assert slow.models["local-large"].prior_prefill_rate is None


def test_a_measured_rate_still_replaces_the_row_prior() -> None:
    chooser = ReplicaChooser(ChoiceSettings(), ReplicaStates())
    ticket = chooser.states.sent("b", 1_000, 1_000, [], now=0.0)
    chooser.states.started("b", ticket, 1_000, 0, now=0.1)  # b measured at 10,000/s
    chooser.states.release("b")
    route = chooser.choose(Request("m", 1_200, [], ENGINE_TPS), ["a", "b"], {"a": 1_008}, 10.0)
    # a: unmeasured, the row's 150/s: 1.28 s; b measured: 0.12 s
    assert route.order[0] == "b"


def test_a_simulated_row_keeps_its_engine_speed_as_its_prior() -> None:
    table = load_model_table()
    assert table.models["sim-large"].prior_prefill_rate == 4_000.0
    assert table.models["claude-sonnet-4-5"].prior_prefill_rate is None  # the global prior
    row = table.models["sim-large"].model_dump(exclude_unset=True)
    with pytest.raises(ValidationError, match="prior prefill rate is its prefill_tokens_per_s"):
        ModelSpec.model_validate({**row, "prior_prefill_tokens_per_s": 100.0})


def test_the_row_prior_can_be_written_in_the_table() -> None:
    row = load_model_table().models["local-large"].model_dump(exclude_unset=True)
    spec = ModelSpec.model_validate({**row, "prior_prefill_tokens_per_s": 2_500.0})
    assert spec.prior_prefill_rate == 2_500.0
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({**row, "prior_prefill_tokens_per_s": 0})


@pytest.mark.parametrize(
    "value",
    ["local-small", "local-small=", "local-small=0", "local-small=-5", "local-small=fast",
     "local-small=nan", "local-small=inf", "nosuch=150"],
)  # fmt: skip
def test_a_bad_prior_fails_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="CACHEMESH_PRIOR_PREFILL_TPS"):
        model_table_from_env(Env({"CACHEMESH_PRIOR_PREFILL_TPS": value}))
