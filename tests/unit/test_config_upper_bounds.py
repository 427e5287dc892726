"""Whole-number settings with no upper bound were taken at 99999999999999999999999 (counts,
bytes, tokens, dollars, prices), SIM_TIME_SCALE at 1e300 and CACHEMESH_UP_TIMEOUT_S at inf.
Each is refused at start-up in one line naming the variable and its maximum; the maxima keep
a request's bill exact where the limits' Redis adds it (Lua doubles: 2**53)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.common.env import MAX_BYTES, MAX_COUNT, MAX_TOKENS, ConfigError, Env
from services.common.model_overrides import model_table_from_env
from services.common.models import MAX_PRICE_NANOS
from services.common.redis_pool import bounded_redis
from services.http_front.settings import HttpFrontSettings
from services.model.settings import MAX_TIME_SCALE, ModelSettings
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.key_settings import KeyStoreSettings
from services.router.limit_policy import NANOS_PER_DOLLAR
from services.router.limit_settings import MAX_BUDGET_USD
from services.router.settings import READ_AHEAD_MAX_BYTES, RouterSettings
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.tools.stack import cli
from services.tools.stack.lifecycle import StackError

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"CACHEMESH_INTERNAL_TOKEN": "t" * 32, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
SHIPPED = {**read_env_file(ROOT / ".env"), **SECRETS}
HUGE = "99999999999999999999999"


def _router(environ: dict[str, str]) -> object:
    env = Env(environ)
    return RouterSettings.from_env(env, model_table_from_env(env))


def _semantic(environ: dict[str, str]) -> object:
    return SemanticCacheSettings.from_env(Env(environ), OperatingPoint.load())


def _prefix(environ: dict[str, str]) -> object:
    return PrefixCacheSettings.from_env(Env(environ))


LOADERS: dict[str, Callable[[dict[str, str]], object]] = {
    "router": _router,
    "semantic": _semantic,
    "prefix": _prefix,
    "model": ModelSettings.from_env,
    "http": HttpFrontSettings.from_env,
}


def _refusal(service: str, variable: str, value: str) -> str:
    with pytest.raises(ConfigError) as caught:
        LOADERS[service]({**SHIPPED, variable: value})
    message = str(caught.value)
    assert variable in message and "\n" not in message, message
    return message


def _taken(service: str, variable: str, value: str) -> None:
    LOADERS[service]({**SHIPPED, variable: value})


COUNTS = [
    ("router", "CACHEMESH_METRICS_MAX_TENANTS"),
    ("router", "ROUTER_IDEMPOTENCY_MAX"),
    ("router", "ROUTER_BALANCE_ABS_THRESHOLD"),
    ("router", "ROUTER_EJECT_AFTER_FAILURES"),
    ("router", "ROUTER_LIMIT_REQUESTS_PER_MIN"),
    ("router", "ROUTER_LIMIT_TOKENS_PER_MIN"),
    ("router", "ROUTER_REDIS_MAX_CONNECTIONS"),
    ("router", "ROUTER_WRITE_AMORTIZE_TURNS"),
    ("semantic", "SEMANTIC_CACHE_MAX_ENTRIES"),
    ("semantic", "SEMANTIC_CACHE_EMBED_MAX_BATCH"),
    ("semantic", "SEMANTIC_CACHE_EMBED_MAX_QUEUE"),
    ("semantic", "SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT"),
    ("semantic", "SEMANTIC_CACHE_ANN_MIN_ENTRIES"),
    ("prefix", "PREFIX_CACHE_LOOKBACK_BLOCKS"),
    ("prefix", "PREFIX_CACHE_MAX_WARM_ENTRIES"),
    ("prefix", "PREFIX_CACHE_MAX_RECORDS"),
    ("prefix", "PREFIX_CACHE_REDIS_MAX_CONNECTIONS"),
    ("prefix", "PREFIX_CACHE_REPLICA_CAPACITY_BLOCKS"),
    ("prefix", "PREFIX_CACHE_PLAN_MEMO_BLOCKS"),
    ("prefix", "PREFIX_CACHE_KV_MEMO_HASHES"),
    ("model", "MODEL_KV_CAPACITY_BLOCKS"),
    ("http", "HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY"),
]
BYTES = [
    ("router", "ROUTER_IDEMPOTENCY_MAX_BYTES"),
    ("router", "ROUTER_OUTBOX_MAX_BYTES"),
    ("router", "ROUTER_MAX_REQUEST_BYTES"),
    ("semantic", "SEMANTIC_CACHE_MAX_BYTES"),
    ("http", "HTTP_FRONT_MAX_BODY_BYTES"),
]


@pytest.mark.parametrize(("service", "variable"), COUNTS)
def test_a_count_past_its_maximum_is_refused_naming_it(service: str, variable: str) -> None:
    message = _refusal(service, variable, HUGE)
    assert f"at most {MAX_COUNT:,} (a count)" in message


@pytest.mark.parametrize(("service", "variable"), BYTES)
def test_a_byte_limit_past_its_maximum_is_refused_naming_it(service: str, variable: str) -> None:
    message = _refusal(service, variable, HUGE)
    assert f"at most {MAX_BYTES:,} (bytes)" in message


def test_the_maxima_themselves_are_taken() -> None:
    _taken("router", "ROUTER_IDEMPOTENCY_MAX", str(MAX_COUNT))
    _taken("router", "ROUTER_OUTBOX_MAX_BYTES", str(MAX_BYTES))
    _taken("router", "ROUTER_READ_AHEAD_MAX_BYTES", str(READ_AHEAD_MAX_BYTES))
    _refusal("router", "ROUTER_READ_AHEAD_MAX_BYTES", str(READ_AHEAD_MAX_BYTES + 1))
    _refusal("router", "ROUTER_READ_AHEAD_MAX_BYTES", "-1")
    _taken("router", "ROUTER_KV_CAPACITY_TOKENS", str(MAX_TOKENS))
    _refusal("router", "ROUTER_KV_CAPACITY_TOKENS", str(MAX_TOKENS + 1))
    _taken("router", "ROUTER_BUDGET_USD_PER_DAY", f"{MAX_BUDGET_USD}")
    _taken("model", "SIM_TIME_SCALE", f"{MAX_TIME_SCALE:g}")


@pytest.mark.parametrize("variable", ["ROUTER_BUDGET_USD_PER_DAY", "ROUTER_BUDGET_USD_PER_MONTH"])
def test_a_budget_past_what_the_limits_add_exactly_is_refused(variable: str) -> None:
    for value in (HUGE, f"{MAX_BUDGET_USD}.000000001"):
        assert f"at most {MAX_BUDGET_USD:,} US dollars" in _refusal("router", variable, value)


def test_the_money_bounds_keep_the_limits_arithmetic_exact() -> None:
    """The limits' Redis compares a spend with a budget, and adds a bill, in Lua doubles:
    exact below 2**53 (a budget of 2**53 + 1 nanos read as reached by a spend of 2**53, and
    a bill of 10**17 failed INCRBY). A request's bill: its prompt and its output, each at most
    MAX_TOKENS, at most MAX_PRICE_NANOS a token."""
    assert MAX_BUDGET_USD * NANOS_PER_DOLLAR < 2**53
    assert 2 * MAX_TOKENS * MAX_PRICE_NANOS < 2**53


@pytest.mark.parametrize(
    ("variable", "value", "maximum"),
    [
        ("CACHEMESH_PRICES", f"sim-small={HUGE}/1", f"{MAX_PRICE_NANOS:,} (nano-dollars a token)"),
        ("CACHEMESH_PRICES", f"sim-small=1/{'9' * 5000}", f"{MAX_PRICE_NANOS:,}"),
        ("CACHEMESH_CONTEXT_WINDOWS", f"sim-small={HUGE}", f"{MAX_TOKENS:,} (tokens)"),
        ("CACHEMESH_CONTEXT_WINDOWS", f"sim-small={'9' * 5000}", f"{MAX_TOKENS:,} (tokens)"),
        ("CACHEMESH_MAX_OUTPUT_TOKENS", f"*={HUGE}", f"{MAX_TOKENS:,} (tokens)"),
        ("CACHEMESH_MAX_OUTPUT_TOKENS", f"sim-small={'9' * 5000}", f"{MAX_TOKENS:,} (tokens)"),
    ],
)
def test_a_model_list_figure_past_its_maximum_is_refused(
    variable: str, value: str, maximum: str
) -> None:
    """5000 digits: int() raises ValueError past 4300, a traceback naming no variable."""
    message = _refusal("router", variable, value)
    assert f"at most {maximum}" in message
    assert ("sim-small" in message) or ("(*)" in message)
    assert len(message) < 300


def test_a_price_at_its_maximum_is_taken_and_one_scaled_past_it_is_refused() -> None:
    # sim-small's 1-hour write is 2x its input: half the maximum puts it at the maximum
    _taken("router", "CACHEMESH_PRICES", f"sim-small={MAX_PRICE_NANOS // 2}/{MAX_PRICE_NANOS}")
    # the row's cache writes keep their ratio to its input price (1.25x, 2x): past the maximum
    message = _refusal("router", "CACHEMESH_PRICES", f"claude-sonnet-4-5={MAX_PRICE_NANOS}/1")
    assert "claude-sonnet-4-5" in message and str(MAX_PRICE_NANOS) in message


def test_a_time_scale_past_its_maximum_is_refused() -> None:
    assert f"<= {MAX_TIME_SCALE}" in _refusal("model", "SIM_TIME_SCALE", "1e300")


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "0"])
def test_an_up_timeout_that_never_ends_is_refused(value: str) -> None:
    with pytest.raises(StackError, match=r"^CACHEMESH_UP_TIMEOUT_S: must be "):
        cli._up_timeout({"CACHEMESH_UP_TIMEOUT_S": value})


@pytest.mark.parametrize("variable", ["ROUTER_ANSWERS_REDIS_URL", "ROUTER_LIMITS_REDIS_URL"])
@pytest.mark.parametrize("value", ["not a url", "http://127.0.0.1:50056/2"])
def test_a_router_redis_url_redis_cannot_read_is_refused_naming_it(
    variable: str, value: str
) -> None:
    """The loader takes them; the client the router builds at start-up (bounded_redis, as
    PREFIX_CACHE_REDIS_URL's) refuses them before any other work, in one line."""
    with pytest.raises(ConfigError) as caught:
        bounded_redis(variable, value, 1, 1.0)
    message = str(caught.value)
    assert message.startswith(f"{variable}: not a Redis URL redis-py can read (")
    assert "((" not in message and "\n" not in message


def test_an_api_key_file_that_cannot_be_read_is_refused_naming_it(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):  # absent; a directory (EISDIR)
        env = Env({"CACHEMESH_API_KEYS_FILE": str(path)})
        with pytest.raises(ConfigError, match=r"CACHEMESH_API_KEYS_FILE\)$"):
            KeyStoreSettings.from_env(env).open(lambda: 0.0, lambda: 0.0)
