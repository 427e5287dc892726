"""Decimal settings with no upper bound were taken at 1e23: a near-tie fraction past 1 made
every replica a tie, a prior prefill rate of 1e23 tokens/s predicted no prefill at all, a
cacheable temperature past the providers' 2 meant nothing. Each is refused at start-up in one
line naming the variable and its range; NaN and infinity are refused too. The model table's
rates (``prefill_tokens_per_s`` and the others: a TOML ``inf`` was taken) have the same
maximum as CACHEMESH_PRIOR_PREFILL_TPS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.common.env import ConfigError, Env
from services.common.model_overrides import model_table_from_env
from services.common.models import load_model_table
from services.router.settings import RouterSettings
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"CACHEMESH_INTERNAL_TOKEN": "t" * 32, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
SHIPPED = {**read_env_file(ROOT / ".env"), **SECRETS}
PACKAGED = ROOT / "services" / "common" / "models.toml"
MAX_TOKENS_PER_S = 10_000_000.0  # the README's maximum of a rate (env.MAX_TOKENS_PER_S)


def _router(environ: dict[str, str]) -> object:
    env = Env(environ)
    return RouterSettings.from_env(env, model_table_from_env(env))


def _semantic(environ: dict[str, str]) -> object:
    return SemanticCacheSettings.from_env(Env(environ), OperatingPoint.load())


LOADERS: dict[str, Callable[[dict[str, str]], object]] = {
    "router": _router,
    "semantic": _semantic,
}

# (service, variable, its range as the refusal states it, the largest value taken)
RANGES = [
    ("router", "ROUTER_BALANCE_REL_THRESHOLD", "[1, 1000]", "1000"),
    ("router", "ROUTER_TTFT_TIE_FRACTION", "[0, 1]", "1"),
    ("router", "ROUTER_TTFT_PRIOR_PREFILL_TPS", "[1, 10000000]", f"{MAX_TOKENS_PER_S:g}"),
    ("router", "ROUTER_TTFT_WORK_WEIGHT", "[0, 100]", "100"),
    ("semantic", "SEMANTIC_CACHE_MAX_TEMPERATURE", "[0, 2]", "2"),
]


def _refusal(service: str, variable: str, value: str) -> str:
    with pytest.raises(ConfigError) as caught:
        LOADERS[service]({**SHIPPED, variable: value})
    message = str(caught.value)
    assert variable in message and "\n" not in message, message
    return message


@pytest.mark.parametrize(("service", "variable", "bounds", "most"), RANGES)
@pytest.mark.parametrize("value", ["1e23", "nan", "inf", "-inf", "-1"])
def test_a_decimal_setting_out_of_its_range_is_refused_naming_it(
    service: str, variable: str, bounds: str, most: str, value: str
) -> None:
    message = _refusal(service, variable, value)
    if value in ("1e23", "-1"):
        assert f"within {bounds}" in message, message


@pytest.mark.parametrize(("service", "variable", "bounds", "most"), RANGES)
def test_a_decimal_setting_at_its_maximum_is_taken(
    service: str, variable: str, bounds: str, most: str
) -> None:
    LOADERS[service]({**SHIPPED, variable: most})


@pytest.mark.parametrize("figure", ["1e23", "nan", "inf", "0", "-5", "10000000.5"])
def test_a_row_prior_prefill_rate_out_of_range_is_refused_naming_it(figure: str) -> None:
    message = _refusal("router", "CACHEMESH_PRIOR_PREFILL_TPS", f"local-small={figure}")
    assert "local-small" in message and "10000000" in message, message


def test_a_row_prior_prefill_rate_at_the_maximum_is_taken() -> None:
    value = f"local-small={MAX_TOKENS_PER_S:g}"
    table = model_table_from_env(Env({"CACHEMESH_PRIOR_PREFILL_TPS": value}))
    assert table.models["local-small"].prior_prefill_tokens_per_s == MAX_TOKENS_PER_S


SIM_SMALL_RATES = "prefill_tokens_per_s = 12000.0\ndecode_tokens_per_s = 180.0\n"
LOCAL_SMALL_SLOTS = "context_window_tokens = 8192\nmax_output_tokens = 4096\nreplica_slots = 1\n"


@pytest.mark.parametrize("rate", ["inf", "nan", "1e23"])
@pytest.mark.parametrize(
    "field", ["prefill_tokens_per_s", "decode_tokens_per_s", "prior_prefill_tokens_per_s"]
)
def test_a_model_file_rate_out_of_range_is_refused(tmp_path: Path, field: str, rate: str) -> None:
    """A simulated row's rates; a self-hosted row's prior (a simulated row may have none)."""
    text = PACKAGED.read_text()
    assert SIM_SMALL_RATES in text and text.count(LOCAL_SMALL_SLOTS) == 1
    if field.startswith("prior"):
        text = text.replace(LOCAL_SMALL_SLOTS, f"{LOCAL_SMALL_SLOTS}{field} = {rate}\n")
    else:
        rates = {"prefill_tokens_per_s": "12000.0", "decode_tokens_per_s": "180.0", field: rate}
        lines = "".join(f"{name} = {value}\n" for name, value in rates.items())
        text = text.replace(SIM_SMALL_RATES, lines, 1)
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field) as caught:
        load_model_table(path)
    assert "simulated" not in str(caught.value)  # refused for its rate, not for its row
