"""The configuration that ships (.env, which `make up` and compose both read), not only the
code's defaults: a wrong value there passed every test that built settings from defaults."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cachemesh.envfile import read_env_file
from services.common.env import Env
from services.common.metrics import MAX_TENANTS_VAR, OTHER
from services.prefix_cache.settings import PrefixCacheSettings
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = read_env_file(ROOT / ".env")


def test_the_prefix_lookback_is_anthropics_twenty_blocks() -> None:
    """Anthropic checks for a cache hit at 20 block positions at each breakpoint, the
    breakpoint included (prompt caching docs); another lookback bills reads the provider
    would not give, or misses it would not."""
    assert SHIPPED["PREFIX_CACHE_LOOKBACK_BLOCKS"] == "20"
    env = Env({**SHIPPED, "CACHEMESH_INTERNAL_TOKEN": "t" * 32})  # a secret: not in .env
    assert PrefixCacheSettings.from_env(env).lookback_blocks == 20


def test_the_semantic_operating_point_is_the_calibrated_one() -> None:
    """.env repeats the operating point `make calibrate-cache` wrote; they must not drift."""
    shipped = OperatingPoint.load()
    settings = SemanticCacheSettings.from_env(Env(SHIPPED), shipped)
    assert settings.threshold == pytest.approx(shipped.threshold)
    assert settings.verifier_min_p == pytest.approx(shipped.min_probability)
    assert settings.ambiguity_margin == pytest.approx(shipped.margin)


def test_single_flight_and_the_stores_are_on() -> None:
    settings = SemanticCacheSettings.from_env(Env(SHIPPED), OperatingPoint.load())
    assert settings.lease_wait_s > 0 and settings.lease_s >= settings.lease_wait_s
    assert settings.max_entries >= 10_000 and settings.ttl_s >= 3600


def test_the_router_models_the_replicas_kv_capacity_as_the_engines_have_it() -> None:
    """The ttft policy's eviction model is what make bench-prefix measured; at another
    capacity than the engines' it counts evicted prefixes as warm (or warm ones as gone)."""
    from services.common.model_overrides import model_table_from_env
    from services.router.settings import RouterSettings

    blocks = int(SHIPPED["MODEL_KV_CAPACITY_BLOCKS"])
    assert int(SHIPPED["PREFIX_CACHE_REPLICA_CAPACITY_BLOCKS"]) == blocks
    # the secrets are not in .env: the stack runner hands them over
    env = Env(
        {**SHIPPED, "CACHEMESH_INTERNAL_TOKEN": "t" * 32, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
    )
    settings = RouterSettings.from_env(env, model_table_from_env(env))
    assert settings.choice.ttft.kv_capacity_tokens == blocks * 16


def test_the_tenant_cap_comment_names_the_label_the_code_uses() -> None:
    """.env's comment on the metrics' tenant cap said "other"; the label is "_other" (no
    tenant's name starts with "_"), and a dashboard query written from the comment finds
    nothing."""
    lines = (ROOT / ".env").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{MAX_TENANTS_VAR}="))
    assert f'"{OTHER}"' in lines[at - 1], lines[at - 1]


def test_the_limits_redis_example_is_a_database_of_the_stacks_redis() -> None:
    """.env's commented ROUTER_LIMITS_REDIS_URL example named 127.0.0.1:6379, where the stack
    runs no Redis (its own, which appends every write, is at PREFIX_CACHE_REDIS_URL's
    address): uncommented, the router stopped at start-up, or counted in another Redis."""
    lines = (ROOT / ".env").read_text().splitlines()
    [example] = [line for line in lines if line.startswith("# ROUTER_LIMITS_REDIS_URL=")]
    limits = urlsplit(example.split("=", 1)[1])
    stack = urlsplit(SHIPPED["PREFIX_CACHE_REDIS_URL"])
    assert limits.netloc == stack.netloc, example
    others = {stack.path, urlsplit(SHIPPED["ROUTER_ANSWERS_REDIS_URL"]).path}
    assert limits.path not in others, example  # a database of its own
