"""A replica, simulated or a provider's, refuses at start-up a model row whose vocabulary its
process did not load (one check, ``Tokenizers.covering``): it never counts a gpt-4o row with
cl100k_base, nor fails only on that row's first request."""

from __future__ import annotations

import pytest

from services.common.models import load_model_table
from services.common.tokens import TokenizerError, Tokenizers, load_cl100k
from services.model.engine import SimEngine
from services.model.kv_cache import KvBlockCache
from tests.providers.replica import provider_replica, provider_settings
from tests.unit.test_provider_deadline import RateLimitedAdapter

TABLE = load_model_table()
ROWS = {"sim-small": TABLE.models["sim-small"], "gpt-4o": TABLE.models["gpt-4o"]}
REFUSED = "gpt-4o is counted with o200k_base, which this process did not load"


def test_covering_refuses_a_row_whose_vocabulary_is_not_loaded() -> None:
    cl100k = load_cl100k()
    assert Tokenizers.covering(cl100k, [ROWS["sim-small"]]).for_spec(ROWS["sim-small"]) is cl100k
    with pytest.raises(TokenizerError, match=REFUSED):
        Tokenizers.covering(cl100k, ROWS.values())


def test_the_simulated_engine_refuses_it() -> None:
    with pytest.raises(TokenizerError, match=REFUSED):
        SimEngine(
            models=ROWS,
            replica_id="r",
            tokenizer=load_cl100k(),
            kv_cache=KvBlockCache(10),
            time_scale=0.0,
        )


def test_a_provider_replica_refuses_it() -> None:
    settings = provider_settings("openai", "http://127.0.0.1:1", "sk-test")
    with pytest.raises(TokenizerError, match=REFUSED):
        provider_replica(
            settings,
            [ROWS["gpt-4o"]],
            adapter=RateLimitedAdapter("1", 0),
            replica_id="openai-1",
            tokenizer=load_cl100k(),
        )
