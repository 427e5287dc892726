"""Exact nano-dollar costs at the published prices (models.toml; Anthropic pricing page:
5m write 1.25x, 1h write 2x, read 0.1x the base input price)."""

from __future__ import annotations

from services.common.models import ModelSpec, load_model_table
from services.prefix_cache.pricing import charge, cost_nanos
from services.prefix_cache.rules import Split

TABLE = load_model_table()
SMALL = TABLE.models["sim-small"]
LARGE = TABLE.models["sim-large"]


def split(input_: int = 0, w5: int = 0, w1: int = 0, read: int = 0) -> Split:
    return Split(input_tokens=input_, write_5m_tokens=w5, write_1h_tokens=w1, read_tokens=read)


def test_cache_read_costs_a_tenth_of_input_2000_tokens_on_sim_large_is_600000_nanos() -> None:
    assert cost_nanos(split(read=2000), 0, LARGE) == 600_000


def test_cache_read_on_sim_small_2000_tokens_is_200000_nanos() -> None:
    assert cost_nanos(split(read=2000), 0, SMALL) == 200_000


def test_each_part_has_its_own_price_on_sim_large() -> None:
    # 300 x 3000 + 500 x 3750 + 1100 x 6000 + 2000 x 300 + 100 x 15000
    got = cost_nanos(split(input_=300, w5=500, w1=1100, read=2000), 100, LARGE)
    assert got == 900_000 + 1_875_000 + 6_600_000 + 600_000 + 1_500_000


def test_each_part_has_its_own_price_on_sim_small() -> None:
    # 300 x 1000 + 500 x 1250 + 1100 x 2000 + 2000 x 100 + 100 x 5000
    got = cost_nanos(split(input_=300, w5=500, w1=1100, read=2000), 100, SMALL)
    assert got == 300_000 + 625_000 + 2_200_000 + 200_000 + 500_000


def test_saved_is_negative_on_a_turn_that_pays_a_5m_write() -> None:
    money = charge(split(input_=50, w5=2000), 20, LARGE, LARGE)
    assert money.cost_nanos == 50 * 3000 + 2000 * 3750 + 20 * 15000  # 7_950_000
    assert money.baseline_nanos == 2050 * 3000 + 20 * 15000  # 6_450_000
    assert money.saved_nanos == -1_500_000


def test_saved_is_positive_on_a_read_turn() -> None:
    money = charge(split(input_=50, read=2000), 20, LARGE, LARGE)
    assert money.cost_nanos == 150_000 + 600_000 + 300_000
    assert money.saved_nanos == 6_450_000 - 1_050_000


def test_baseline_is_priced_on_the_baseline_model() -> None:
    # served by sim-small, baseline = the large tier (the "auto" request's baseline)
    money = charge(split(input_=100, read=2000), 10, SMALL, LARGE)
    assert money.cost_nanos == 100 * 1000 + 2000 * 100 + 10 * 5000
    assert money.baseline_nanos == 2100 * 3000 + 10 * 15000


GPT_5_4 = TABLE.models["gpt-5-4"]


def test_gpt_5_4_over_272k_prompt_tokens_bills_the_whole_request_at_the_long_context_rates() -> (
    None
):
    """OpenAI bills a GPT-5.4 prompt of more than 272,000 input tokens, cached ones included,
    at 2x input and cached input and 1.5x output for the whole request: a prompt of 272,001
    tokens, 200,000 of them read from the cache, was billed at the standard rates."""
    at = split(input_=72_000, read=200_000)  # 272,000 tokens: the standard rates
    over = split(input_=72_001, read=200_000)  # 272,001: the long-context rates, all of it
    assert cost_nanos(at, 1000, GPT_5_4) == 72_000 * 2500 + 200_000 * 250 + 1000 * 15000
    assert cost_nanos(over, 1000, GPT_5_4) == 72_001 * 5000 + 200_000 * 500 + 1000 * 22500
    assert charge(at, 1000, GPT_5_4, GPT_5_4).baseline_nanos == 272_000 * 2500 + 1000 * 15000
    baseline = charge(over, 1000, GPT_5_4, GPT_5_4).baseline_nanos
    assert baseline == GPT_5_4.baseline_nanos(272_001, 1000) == 272_001 * 5000 + 1000 * 22500


def test_a_long_context_tier_prices_the_cache_writes_of_the_row_too() -> None:
    row = LARGE.model_dump(exclude_unset=True) | {
        "id": "long-large",
        "long_context": {
            "above_tokens": 1000,
            "input_nanos": 6000,
            "output_nanos": 22500,
            "cache_write_5m_nanos": 7500,
            "cache_write_1h_nanos": 12000,
            "cache_read_nanos": 600,
        },
    }
    spec = ModelSpec.model_validate(row)
    # 1,000 tokens: the row's own prices; 1,001: the long-context ones on every part
    assert cost_nanos(split(input_=100, w5=200, w1=300, read=400), 10, spec) == cost_nanos(
        split(input_=100, w5=200, w1=300, read=400), 10, LARGE
    )
    got = cost_nanos(split(input_=101, w5=200, w1=300, read=400), 10, spec)
    assert got == 101 * 6000 + 200 * 7500 + 300 * 12000 + 400 * 600 + 10 * 22500
