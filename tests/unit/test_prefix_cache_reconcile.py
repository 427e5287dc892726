"""Reconciliation: the provider's reported usage, in its own JSON shape, bills FINAL; the
estimate is kept and the drift is counted (prompt-caching docs of Anthropic and OpenAI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.json_format import ParseDict

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.tokens import Tokenizer, Tokenizers, load_cl100k, load_tokenizers
from services.prefix_cache.core import BadRequest, PrefixCacheCore, TokenizerSlot
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.reconcile import BadUsage, reported_usage
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TenantTotals
from services.prefix_cache.warm import WarmStore
from tests.unit.conftest import LedgerFactory

TABLE = load_model_table()
USAGE = Path(__file__).parent / "data" / "usage"


def anthropic(name: str) -> pc.ProviderUsage:
    raw = json.loads((USAGE / name).read_text())
    return pc.ProviderUsage(
        anthropic=ParseDict(raw, pc.AnthropicUsage(), ignore_unknown_fields=True)
    )


def openai(name: str) -> pc.ProviderUsage:
    raw = json.loads((USAGE / name).read_text())
    return pc.ProviderUsage(openai=ParseDict(raw, pc.OpenAIUsage(), ignore_unknown_fields=True))


def test_anthropic_usage_maps_one_to_one_input_excludes_cache_tokens() -> None:
    got = reported_usage(anthropic("anthropic_write_5m.json"), TABLE.models["claude-sonnet-4"])
    assert got.split == Split(
        input_tokens=21, write_5m_tokens=188086, write_1h_tokens=0, read_tokens=0
    )
    assert got.output_tokens == 393 and got.split.prompt_tokens == 188107


def test_anthropic_ttl_breakdown_splits_the_creation_tokens() -> None:
    got = reported_usage(anthropic("anthropic_read_and_1h_write.json"), TABLE.models["sim-large"])
    assert got.split == Split(
        input_tokens=50, write_5m_tokens=48, write_1h_tokens=200, read_tokens=1800
    )


def test_openai_prompt_tokens_include_cached_so_input_is_the_rest_no_double_count() -> None:
    got = reported_usage(openai("openai_cached.json"), TABLE.models["gpt-4o"])
    assert got.split == Split(
        input_tokens=86, write_5m_tokens=0, write_1h_tokens=0, read_tokens=1920
    )
    assert got.split.prompt_tokens == 2006 and got.output_tokens == 300


def _bad_anthropic(**fields: int) -> pc.ProviderUsage:
    usage = anthropic("anthropic_read_and_1h_write.json")
    for name, value in fields.items():
        if name.startswith("e_"):
            setattr(usage.anthropic.cache_creation, name[2:], value)
        else:
            setattr(usage.anthropic, name, value)
    return usage


def _bad_openai(**fields: int) -> pc.ProviderUsage:
    usage = openai("openai_cached.json")
    for name, value in fields.items():
        if name == "cached_tokens":
            usage.openai.prompt_tokens_details.cached_tokens = value
        else:
            setattr(usage.openai, name, value)
    return usage


@pytest.mark.parametrize(
    ("usage", "model", "field"),
    [
        (_bad_anthropic(input_tokens=-1), "sim-large", "anthropic.input_tokens"),
        (_bad_anthropic(e_ephemeral_1h_input_tokens=199), "sim-large", "cache_creation"),
        (
            _bad_anthropic(
                input_tokens=0,
                cache_creation_input_tokens=0,
                cache_read_input_tokens=0,
                e_ephemeral_5m_input_tokens=0,
                e_ephemeral_1h_input_tokens=0,
            ),
            "sim-large",
            "0 tokens",
        ),
        (_bad_openai(cached_tokens=2007), "gpt-4o", "cached_tokens"),
        (_bad_openai(total_tokens=9), "gpt-4o", "total_tokens"),
        (_bad_openai(completion_tokens=-3), "gpt-4o", "completion_tokens"),
        (openai("openai_cached.json"), "sim-large", "openai"),  # the other provider's shape
        (pc.ProviderUsage(), "sim-large", "provider_usage"),
    ],
)
def test_impossible_reports_are_rejected_naming_the_field(
    usage: pc.ProviderUsage, model: str, field: str
) -> None:
    with pytest.raises(BadUsage, match=field):
        reported_usage(usage, TABLE.models[model])


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _core(tokenizer: Tokenizer, store: WarmStore, make_ledger: LedgerFactory) -> PrefixCacheCore:
    return PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizer),
        cache=store,
        views=ReplicaViews(1024),
        ledger=make_ledger(3_600_000),
        clock=ManualClock(),
        lookback=20,
    )


def _request() -> pb.CompleteRequest:
    system = " ".join(f"Policy {i}: be brief." for i in range(300))
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=system, cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi?")])],
        max_tokens=50,
    )


async def test_totals_use_the_report_keep_the_estimate_and_count_the_drift(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    core = _core(tokenizer, warm_store, make_ledger)
    estimate = await core.warm("a", "r1", "sim-large", _request(), "")
    report = anthropic("anthropic_read_and_1h_write.json")
    final = await core.final("a", "r1", "sim-large", 0, 0, "", report)
    reported = Split(50, 48, 200, 1800)
    assert final.reconciled and final.split == reported and final.estimate == estimate
    # sim-large prices: 50 x 3000 + 48 x 3750 + 200 x 6000 + 1800 x 300 + 503 x 15000
    assert final.charge.cost_nanos == 150_000 + 180_000 + 1_200_000 + 540_000 + 7_545_000
    totals = await core.totals("a")
    assert (totals.input_tokens, totals.cache_read_input_tokens, totals.output_tokens) == (
        50,
        1800,
        503,
    )
    assert totals.reconciled_requests == 1
    assert totals.drift_prompt_tokens == 2098 - estimate.prompt_tokens
    assert totals.drift_abs_prompt_tokens == abs(2098 - estimate.prompt_tokens)
    assert totals.drift_cache_read_tokens == 1800 - estimate.read_tokens
    assert totals.drift_cost_nanos == final.charge.cost_nanos - final.estimate_charge.cost_nanos
    assert await core.final("a", "r1", "sim-large", 0, 0, "", report) == final  # idempotent


async def test_a_bad_report_records_nothing(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    core = _core(tokenizer, warm_store, make_ledger)
    await core.warm("a", "r1", "sim-large", _request(), "")
    with pytest.raises(BadUsage):
        await core.final("a", "r1", "sim-large", 0, 0, "", _bad_anthropic(input_tokens=-5))
    with pytest.raises(BadRequest, match="output_tokens"):
        await core.final("a", "r1", "sim-large", 7, 0, "", anthropic("anthropic_write_5m.json"))
    assert await core.totals("a") == TenantTotals()
    final = await core.final("a", "r1", "sim-large", 0, 0, "", anthropic("anthropic_write_5m.json"))
    assert final.reconciled and (await core.totals("a")).requests == 1


@pytest.fixture(scope="module")
def tokenizers() -> Tokenizers:
    return load_tokenizers(TABLE.models.values())


async def test_a_gpt_5_4_prompt_over_272k_tokens_is_billed_at_the_long_context_rates(
    tokenizers: Tokenizers, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """The review's repro: a 311,004-token prompt and 2,000 output tokens on gpt-5-4 were
    billed 807,510,000 nanos at the standard rates; OpenAI bills prompts of more than 272,000
    input tokens at 2x input and 1.5x output for the whole request, 1,600,020,000."""
    clock = ManualClock()
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizers),
        cache=warm_store,
        views=ReplicaViews(1024),
        ledger=make_ledger(3_600_000),
        clock=clock,
        lookback=20,
        plans=PlanMemo(clock, ttl_ms=600_000, max_blocks=1_000_000),
    )
    text = "".join(
        f"The contract clause number {i} states obligations of the parties. " for i in range(24_000)
    )
    request = pb.CompleteRequest(
        model="gpt-5-4",
        max_tokens=2000,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )
    plan = await core.plan("a", "gpt-5-4", request, ["r1"])
    assert plan.split.prompt_tokens == 311_004
    await core.warm("a", "r1", "gpt-5-4", None, "r1", plan_id=plan.plan_id)
    usage = pc.ProviderUsage(
        openai=pc.OpenAIUsage(prompt_tokens=311_004, completion_tokens=2000, total_tokens=313_004)
    )
    final = await core.final("a", "r1", "gpt-5-4", 0, 0, "", usage)
    assert final.reconciled and final.split.prompt_tokens == 311_004
    assert final.charge.cost_nanos == 311_004 * 5000 + 2000 * 22500 == 1_600_020_000
    assert final.charge.baseline_nanos == 1_600_020_000  # the same row's, also long-context
    assert final.estimate_charge.cost_nanos == 1_600_020_000  # the WARM's split, the same size
