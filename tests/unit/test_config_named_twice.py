"""A model, namespace or replica named twice in one setting is refused at start-up: the last
one silently won, or (prices) the second applied on top of the first and they compounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.common.env import ConfigError, Env
from services.common.model_overrides import model_table_from_env
from services.router.settings import RouterSettings
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"CACHEMESH_INTERNAL_TOKEN": "t" * 32, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
SHIPPED = {**read_env_file(ROOT / ".env"), **SECRETS}


def _refused_table(variable: str, value: str) -> str:
    with pytest.raises(ConfigError) as caught:
        model_table_from_env(Env({variable: value}))
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and "\n" not in message
    return message


def test_a_price_named_twice_is_refused_not_compounded() -> None:
    """sim-large=3/15,sim-large=3000/15000 billed cache reads 0 (expected 300) and 5-minute
    writes 4000 (expected 3750): the second entry scaled the first's result."""
    message = _refused_table("CACHEMESH_PRICES", "sim-large=3/15,sim-large=3000/15000")
    assert "'sim-large' is named twice" in message
    once = model_table_from_env(Env({"CACHEMESH_PRICES": "sim-large=3000/15000"}))
    assert once.models["sim-large"].input_nanos == 3000


@pytest.mark.parametrize("figure", ["²", "\u0661\u0660", "3²"])
def test_a_price_of_non_ascii_digits_is_one_line_not_a_traceback(figure: str) -> None:
    # str.isdigit() took "²" and int() then raised ValueError: a traceback at start-up
    message = _refused_table("CACHEMESH_PRICES", f"sim-large=3/{figure}")
    assert "expected model=input/output" in message


def test_a_context_window_named_twice_is_refused() -> None:
    message = _refused_table("CACHEMESH_CONTEXT_WINDOWS", "sim-small=10,sim-small=20")
    assert "'sim-small' is named twice" in message


def test_a_prior_prefill_rate_named_twice_is_refused() -> None:
    value = "claude-haiku-4-5=5000,claude-haiku-4-5=6000"
    message = _refused_table("CACHEMESH_PRIOR_PREFILL_TPS", value)
    assert "'claude-haiku-4-5' is named twice" in message


def test_a_namespace_ttl_named_twice_is_refused() -> None:
    env = Env({"SEMANTIC_CACHE_NAMESPACE_TTL_S": "news=604800,news=60"})
    with pytest.raises(ConfigError, match=r"^SEMANTIC_CACHE_NAMESPACE_TTL_S: .*'news'.* twice"):
        SemanticCacheSettings.from_env(env, OperatingPoint.load())
    env = Env({"SEMANTIC_CACHE_NAMESPACE_TTL_S": "news=604800,sport=60"})
    policy = SemanticCacheSettings.from_env(env, OperatingPoint.load()).policy
    assert policy is not None and policy.namespace_ttl_s == {"news": 604800.0, "sport": 60.0}


def test_one_replica_listed_twice_for_a_model_is_refused() -> None:
    """One process counted as two replicas (twice its share of the calls, two ejections)."""
    twice = "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50055,sim-large=127.0.0.1:50055"
    env = Env({**SHIPPED, "MODEL_REPLICAS": twice})
    with pytest.raises(ConfigError, match=r"^MODEL_REPLICAS: sim-large=127.0.0.1:50055 is listed"):
        RouterSettings.from_env(env, model_table_from_env(env))
    # two replicas of a model, and one process serving two models, stay valid
    valid = "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50054,sim-large=127.0.0.1:50055"
    env = Env({**SHIPPED, "MODEL_REPLICAS": valid})
    replicas = RouterSettings.from_env(env, model_table_from_env(env)).replicas
    assert replicas["sim-large"] == ("127.0.0.1:50054", "127.0.0.1:50055")


@pytest.mark.parametrize("figure", ["²", "\u0661\u0660"])
def test_an_output_cap_of_non_ascii_digits_is_one_line_not_a_traceback(figure: str) -> None:
    message = _refused_table("CACHEMESH_MAX_OUTPUT_TOKENS", f"*={figure}")
    assert "expected model=tokens" in message


def test_a_stack_port_of_non_ascii_digits_is_refused_not_a_traceback() -> None:
    from cachemesh.envfile import EnvFileError
    from services.tools.stack.environment import port_of

    with pytest.raises(EnvFileError, match="expected host:port"):
        port_of("127.0.0.1:²")
