"""A replica, simulated or a provider's, refuses at start-up a model row whose vocabulary its
process did not load (one check, ``Tokenizers.covering``): it never counts a gpt-4o row with
cl100k_base, nor fails only on that row's first request."""

from __future__ import annotations

import pytest

from services.common.models import load_model_table
from services.common.tokens import TokenizerError, Tokenizers, load_cl100k
from services.model.engine import SimEngine
from services.model.kv_cache import KvBlockCache
from services.model.providers.api import ProviderApi
from services.model.providers.config import ProviderSettings, Secret
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
    async def set_health(serving: bool) -> None:
        return None

    settings = ProviderSettings(
        backend="openai",
        base_url="http://127.0.0.1:1",
        api_key=Secret("sk-test"),
        max_retries=0,
        backoff_s=0.5,
        backoff_max_s=8.0,
        auth_recheck_s=60.0,
        upstream_ids={},
    )
    with pytest.raises(TokenizerError, match=REFUSED):
        ProviderApi(
            adapter=RateLimitedAdapter("1", 0),
            models={"gpt-4o": ROWS["gpt-4o"]},
            replica_id="openai-1",
            settings=settings,
            tokenizer=load_cl100k(),
            set_health=set_health,
        )
