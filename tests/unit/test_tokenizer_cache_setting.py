"""CACHEMESH_TOKENIZER_CACHE_TOKENS: the encoding cache's budget in each service that tokenizes,
validated at start, and its hits, misses and held tokens on the service's metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken
from prometheus_client import CollectorRegistry, generate_latest

from cachemesh.envfile import read_env_file
from services.common.env import MAX_TOKENS, ConfigError, Env
from services.common.metrics import TokenizerCacheCollector
from services.common.model_overrides import model_table_from_env
from services.common.tokens import (
    CACHE_TOKENS_VAR,
    CACHED_TOKENS,
    Tokenizer,
    cache_tokens_from_env,
    load_cl100k,
    load_vocabulary,
)
from services.model.settings import ModelSettings
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"CACHEMESH_INTERNAL_TOKEN": "t" * 32, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
SHIPPED = {**read_env_file(ROOT / ".env"), **SECRETS}


def _budgets(environ: dict[str, str]) -> set[int]:
    env = Env(environ)
    return {
        RouterSettings.from_env(env, model_table_from_env(env)).tokenizer_cache_tokens,
        PrefixCacheSettings.from_env(env).tokenizer_cache_tokens,
        ModelSettings.from_env(environ).tokenizer_cache_tokens,
    }


def test_each_service_that_tokenizes_reads_the_budget() -> None:
    assert _budgets({k: v for k, v in SHIPPED.items() if k != CACHE_TOKENS_VAR}) == {CACHED_TOKENS}
    assert _budgets({**SHIPPED, CACHE_TOKENS_VAR: "8000000"}) == {8_000_000}
    assert _budgets({**SHIPPED, CACHE_TOKENS_VAR: "0"}) == {0}  # keeps none


@pytest.mark.parametrize("value", ["-1", "lots", str(MAX_TOKENS + 1)])
def test_a_bad_budget_stops_the_start_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=CACHE_TOKENS_VAR):
        cache_tokens_from_env(Env({CACHE_TOKENS_VAR: value}))


def test_a_budget_of_zero_encodes_and_keeps_nothing() -> None:
    encoding: tiktoken.Encoding = load_cl100k()._encoding
    tokenizer = Tokenizer(encoding, cached_tokens=0)
    assert tokenizer.encode("hello world") == (15339, 1917)
    assert tokenizer.encode("hello world") == (15339, 1917)
    stats = tokenizer.cache_stats()
    assert (stats.hits, stats.misses, stats.held_tokens) == (0, 2, 0)


def test_a_vocabulary_is_loaded_once_for_every_budget() -> None:
    small = load_vocabulary("cl100k_base", 1000)
    assert small is load_vocabulary("cl100k_base", 1000)
    assert small.cache_stats().budget_tokens == 1000
    assert small._encoding is load_cl100k()._encoding
    assert load_cl100k().cache_stats().budget_tokens == CACHED_TOKENS


def test_the_metrics_show_hits_misses_and_what_is_held() -> None:
    encoding: tiktoken.Encoding = load_cl100k()._encoding
    tokenizer = Tokenizer(encoding, cached_tokens=10_000)
    loaded: list[Tokenizer] = []
    registry = CollectorRegistry()
    registry.register(TokenizerCacheCollector(lambda: loaded))
    assert b"cachemesh_tokenizer_cache_hits_total{" not in generate_latest(registry)
    loaded.append(tokenizer)
    for text in ("alpha beta", "alpha beta", "gamma"):
        tokenizer.encode(text)
    text = generate_latest(registry).decode()
    held = tokenizer.cache_stats().held_tokens
    assert held > 0
    assert 'cachemesh_tokenizer_cache_hits_total{vocabulary="cl100k_base"} 1.0' in text
    assert 'cachemesh_tokenizer_cache_misses_total{vocabulary="cl100k_base"} 2.0' in text
    assert f'cachemesh_tokenizer_cache_held_tokens{{vocabulary="cl100k_base"}} {held}.0' in text
    assert 'cachemesh_tokenizer_cache_budget_tokens{vocabulary="cl100k_base"} 10000.0' in text
