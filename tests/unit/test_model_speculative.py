"""Speculative decoding in the simulator: the simulated speed-up against Leviathan et al.'s
formula, the same answer and bill with and without a draft, the accepted draft tokens reported,
and the table's and settings' validation."""

from __future__ import annotations

import math

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.env import ConfigError
from services.common.models import ModelSpec, ModelTable, load_model_table
from services.common.tokens import Tokenizer, load_cl100k
from services.model.api import ModelApi
from services.model.engine import Delta, Finished, SimEngine
from services.model.kv_cache import KvBlockCache
from services.model.settings import ModelSettings
from services.model.speculative import (
    Drafting,
    cost_ratio,
    drafting_for,
    expected_speedup,
    expected_tokens_per_step,
    plan_steps,
)
from tests.unit.model_support import RecordingSleep

# (alpha, k) pairs the simulated speed-up is checked at
CASES = [(0.6, 2), (0.8, 4), (0.9, 4), (0.9, 8), (0.95, 6)]
PROMPTS = 150  # answers of 20-120 tokens: about 10,000 decoded tokens a case


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@pytest.fixture(scope="module")
def table() -> ModelTable:
    return load_model_table()


def _engine(
    tokenizer: Tokenizer, table: ModelTable, sleep: RecordingSleep, drafting: Drafting | None
) -> SimEngine:
    return SimEngine(
        models={"sim-large": table.models["sim-large"]},
        replica_id="r1",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(100_000),
        time_scale=1.0,
        sleep=sleep,
        drafting={} if drafting is None else {"sim-large": drafting},
    )


def _request(i: int) -> pb.CompleteRequest:
    text = f"question number {i}: how does the cache keep request {i * 7919} warm?"
    return pb.CompleteRequest(
        model="sim-large",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=4096,
    )


async def _decode(engine: SimEngine, sleep: RecordingSleep, i: int) -> tuple[str, Finished, float]:
    """The answer's text, its end, and the decode's simulated seconds (after the prefill)."""
    prepared = engine.prepare("tenant-a", "sim-large", _request(i))
    pieces: list[str] = []
    finished: Finished | None = None
    sleep.calls.clear()
    async for event in engine.run(prepared):
        if isinstance(event, Delta):
            pieces.append(event.text)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return "".join(pieces), finished, sum(sleep.calls[1:])  # calls[0] is the prefill


def test_expected_tokens_per_step_is_the_papers_formula() -> None:
    assert expected_tokens_per_step(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert expected_tokens_per_step(0.0, 4) == 1.0  # every draft token refused: one a step
    assert expected_tokens_per_step(1.0, 4) == 5.0  # every one kept, plus the bonus token
    # the closed form is the sum of the geometric series 1 + a + ... + a^k
    assert expected_tokens_per_step(0.7, 3) == pytest.approx(sum(0.7**i for i in range(4)))


@pytest.mark.parametrize(("alpha", "k"), CASES)
def test_steps_average_the_expected_tokens_per_step(alpha: float, k: int) -> None:
    draft = load_model_table().models["sim-small"]
    drafting = Drafting(draft, k, alpha)
    steps = plan_steps(b"seed-%d" % k, 200_000, drafting)
    assert sum(s.tokens for s in steps) == 200_000
    assert all(1 <= s.tokens <= k + 1 and s.accepted <= min(k, s.tokens) for s in steps)
    expected = expected_tokens_per_step(alpha, k)
    assert 200_000 / len(steps) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(("alpha", "k"), CASES)
async def test_simulated_speedup_follows_the_formula(
    tokenizer: Tokenizer, table: ModelTable, alpha: float, k: int
) -> None:
    """Same answers decoded with and without the draft through the engine's sleep seam: the
    ratio of the decode times is Leviathan et al.'s E / (k c + 1), c from the two speeds."""
    large, small = table.models["sim-large"], table.models["sim-small"]
    plain_sleep, spec_sleep = RecordingSleep(), RecordingSleep()
    plain = _engine(tokenizer, table, plain_sleep, None)
    spec = _engine(tokenizer, table, spec_sleep, Drafting(small, k, alpha))
    plain_s = spec_s = 0.0
    tokens = accepted = 0
    for i in range(PROMPTS):
        text_a, end_a, seconds_a = await _decode(plain, plain_sleep, i)
        text_b, end_b, seconds_b = await _decode(spec, spec_sleep, i)
        assert text_a == text_b and end_a.output_tokens == end_b.output_tokens  # same answer
        assert end_a.draft_accepted_tokens == 0
        plain_s, spec_s = plain_s + seconds_a, spec_s + seconds_b
        tokens, accepted = tokens + end_b.output_tokens, accepted + end_b.draft_accepted_tokens
    assert plain_s == pytest.approx(tokens / large.decode_rate)
    c = cost_ratio(large, small)
    assert plain_s / spec_s == pytest.approx(expected_speedup(alpha, k, c), rel=0.06)
    # kept draft tokens: every token but the target's own one a step (an answer's last step,
    # cut at its end, may hold kept draft tokens only)
    steps = round(spec_s / (k / small.decode_rate + 1 / large.decode_rate))
    assert tokens - steps <= accepted <= tokens - steps + PROMPTS


def test_speedup_with_a_free_draft_is_the_tokens_per_step() -> None:
    """c -> 0 (a draft that costs nothing): the speed-up is E; above alpha 0.8 with k >= 4
    that is the 2-3x and more that speculative decoding is known for."""
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(3.36, abs=0.01)
    assert 2.0 < expected_speedup(0.8, 2, 0.0) < 3.0
    assert expected_speedup(0.9, 4, 0.05) > 3.0


async def test_the_bill_is_the_same_tokens(tokenizer: Tokenizer, table: ModelTable) -> None:
    """The usage the engine reports (prompt and output tokens) does not change with a draft."""
    small = table.models["sim-small"]
    api_plain = ModelApi(_engine(tokenizer, table, RecordingSleep(), None), offload=False)
    api_spec = ModelApi(
        _engine(tokenizer, table, RecordingSleep(), Drafting(small, 4, 0.9)), offload=False
    )
    request = model_pb2.GenerateRequest(tenant="t", model="sim-large", request=_request(3))
    plain = [c async for c in api_plain.generate(request)]
    spec = [c async for c in api_spec.generate(request)]
    assert plain[0].start == spec[0].start
    assert plain[-1].end.output_tokens == spec[-1].end.output_tokens
    assert plain[-1].end.stop_reason == spec[-1].end.stop_reason
    assert plain[-1].end.draft_accepted_tokens == 0
    assert 0 < spec[-1].end.draft_accepted_tokens < spec[-1].end.output_tokens
    assert "".join(c.text for c in plain) == "".join(c.text for c in spec)


def test_sim_large_drafts_with_sim_small_in_the_table(table: ModelTable) -> None:
    drafting = drafting_for(table.models["sim-large"], table)
    assert drafting is not None
    assert drafting.draft.id == "sim-small"
    assert drafting.tokens > 0 and 0 < drafting.acceptance_rate < 1
    assert drafting_for(table.models["sim-small"], table) is None


def _row(**extra: object) -> dict[str, object]:
    row = load_model_table().models["sim-large"].model_dump(exclude={"id"}, exclude_unset=True)
    for key in ("draft_model", "draft_tokens", "draft_acceptance_rate"):
        row.pop(key, None)
    row.update(extra)
    return row


def _table(rows: dict[str, dict[str, object]]) -> ModelTable:
    small = load_model_table().models["sim-small"].model_dump(exclude={"id"}, exclude_unset=True)
    return ModelTable.model_validate(
        {"models": {"sim-small": small, **rows}, "auto": {"small": "sim-small"}}
    )


def test_the_table_refuses_half_a_drafting() -> None:
    with pytest.raises(ValueError, match="draft_model, draft_tokens"):
        _table({"big": _row(draft_model="sim-small", draft_tokens=4)})
    with pytest.raises(ValueError, match="must be a simulated model"):
        _table({"big": _row(draft_model="nope", draft_tokens=4, draft_acceptance_rate=0.8)})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        _table({"big": _row(draft_model="sim-small", draft_tokens=4, draft_acceptance_rate=1.5)})
    ok = _table({"big": _row(draft_model="sim-small", draft_tokens=3, draft_acceptance_rate=0.7)})
    spec: ModelSpec = ok.models["big"]
    assert drafting_for(spec, ok) == Drafting(ok.models["sim-small"], 3, 0.7)


def _environ(**extra: str) -> dict[str, str]:
    return {"CACHEMESH_INTERNAL_TOKEN": "x" * 32, "MODEL_IDS": "sim-small,sim-large", **extra}


def test_settings_switch_speculative_decoding_on() -> None:
    assert ModelSettings.from_env(_environ()).drafting == {}
    on = ModelSettings.from_env(_environ(SIM_SPECULATIVE="true"))
    assert set(on.drafting) == {"sim-large"}  # sim-small has no draft of its own
    assert math.isclose(on.drafting["sim-large"].acceptance_rate, 0.8)
    with pytest.raises(ConfigError, match="SIM_SPECULATIVE"):
        ModelSettings.from_env(_environ(SIM_SPECULATIVE="maybe"))
