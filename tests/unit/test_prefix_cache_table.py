"""The price/rules table: every row names its source, the published figures, and each rule set
validated by pydantic (required fields present, prices it never bills absent)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from services.common.env import ConfigError
from services.common.models import load_model_table

TABLE = load_model_table()
ROOT = Path(__file__).resolve().parents[2]


def test_every_row_names_its_source_and_a_rule_set() -> None:
    for spec in TABLE.models.values():
        assert spec.source and spec.rules in ("anthropic", "openai", "self_hosted")


@pytest.mark.parametrize(
    ("model", "minimum"),
    [
        ("claude-sonnet-4", 1024),
        ("claude-opus-4-1", 1024),
        ("claude-3-5-haiku", 2048),
        ("claude-opus-4-5", 4096),
        ("claude-haiku-4-5", 4096),
        ("sim-small", 1024),  # DESIGN.md: the simulated models use a 1,024-token minimum
        ("sim-large", 1024),
    ],
)
def test_anthropic_minimum_cacheable_length_per_model(model: str, minimum: int) -> None:
    spec = TABLE.models[model]
    assert spec.rules == "anthropic" and spec.min_cacheable_tokens == minimum


def test_anthropic_cache_prices_are_the_documented_multipliers() -> None:
    for spec in (s for s in TABLE.models.values() if s.rules == "anthropic"):
        assert spec.cache_write_5m_nanos * 4 == spec.input_nanos * 5, spec.id  # 1.25x
        assert spec.cache_write_1h_nanos == spec.input_nanos * 2, spec.id  # 2x
        assert spec.cache_read_nanos * 10 == spec.input_nanos, spec.id  # 0.1x


@pytest.mark.parametrize(("model", "discount"), [("gpt-4o", 50), ("gpt-4-1", 75), ("gpt-5", 90)])
def test_openai_cached_input_discount_and_rules(model: str, discount: int) -> None:
    spec = TABLE.models[model]
    assert spec.cache_read_nanos * 100 == spec.input_nanos * (100 - discount)
    assert (spec.min_cacheable_tokens, spec.cache_increment_tokens) == (1024, 128)
    assert 300 <= spec.idle_retention_s <= 600  # "5-10 minutes of inactivity"
    assert spec.cache_write_5m_nanos == spec.cache_write_1h_nanos == 0  # no write premium


def _table_with(row: str, tmp_path: Path) -> Path:
    text = (ROOT / "services/common/models.toml").read_text()
    path = tmp_path / "models.toml"
    path.write_text(text.replace("[auto]", row + "\n[auto]"))
    tomllib.loads(path.read_text())
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'rules = "anthropic"\ncache_read_nanos = 1\nmin_cacheable_tokens = 1024',
            "need cache_write_5m",
        ),
        (
            (
                'rules = "openai"\ncache_read_nanos = 1\nmin_cacheable_tokens = 1024\n'
                "cache_increment_tokens = 128\nidle_retention_s = 300\ncache_write_5m_nanos = 9"
            ),
            "do not use cache_write_5m",
        ),
        (
            'rules = "self_hosted"\ncache_read_nanos = 0\nkv_block_tokens = 32',
            "kv_block_tokens must be 16",
        ),
    ],
)
def test_each_rule_set_is_validated_when_the_table_loads(
    tmp_path: Path, extra: str, message: str
) -> None:
    row = (
        '[models.bad]\ntier = "small"\nprovider = "openai"\nsource = "x"\ninput_nanos = 10\n'
        f"output_nanos = 10\ncontext_window_tokens = 10\nmax_output_tokens = 10\n{extra}\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_model_table(_table_with(row, tmp_path))


def test_gpt_5_4_has_its_1_05m_window_and_its_long_context_rates() -> None:
    spec = TABLE.models["gpt-5-4"]
    assert spec.context_window_tokens == 1_050_000
    long = spec.long_context
    assert long is not None and long.above_tokens == 272_000
    assert (long.input_nanos, long.cache_read_nanos) == (
        spec.input_nanos * 2,
        spec.cache_read_nanos * 2,
    )
    assert long.output_nanos * 2 == spec.output_nanos * 3  # 1.5x
    assert [s.id for s in TABLE.models.values() if s.long_context is not None] == ["gpt-5-4"]


_OPENAI_ROW = (
    '[models.bad]\ntier = "small"\nprovider = "openai"\nrules = "openai"\nsource = "x"\n'
    "input_nanos = 10\noutput_nanos = 10\ncache_read_nanos = 1\nmin_cacheable_tokens = 1024\n"
    "cache_increment_tokens = 128\nidle_retention_s = 300\ncontext_window_tokens = 2000\n"
    "max_output_tokens = 10\n"
)


@pytest.mark.parametrize(
    ("long_context", "message"),
    [
        (
            "above_tokens = 1000\ninput_nanos = 20\noutput_nanos = 15",
            "long_context needs cache_read",
        ),
        (
            "above_tokens = 1000\ninput_nanos = 20\noutput_nanos = 15\ncache_read_nanos = 2\n"
            "cache_write_5m_nanos = 25",
            "long_context.cache_write_5m_nanos",
        ),
        (
            "above_tokens = 2000\ninput_nanos = 20\noutput_nanos = 15\ncache_read_nanos = 2",
            "above_tokens",
        ),
        (
            "above_tokens = 1000\ninput_nanos = 20.5\noutput_nanos = 15\ncache_read_nanos = 2",
            "input_nanos",
        ),
    ],
)
def test_a_long_context_tier_is_validated_when_the_table_loads(
    tmp_path: Path, long_context: str, message: str
) -> None:
    row = f"{_OPENAI_ROW}\n[models.bad.long_context]\n{long_context}\n"
    with pytest.raises(ConfigError, match=message):
        load_model_table(_table_with(row, tmp_path))
