"""Settings a review found taken at start-up though they broke every call later: a duration
past what gRPC's deadlines and Redis's TTLs hold, an address gRPC can never dial. Each is
refused at start-up with one line naming the variable and what it takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.common.env import MAX_DURATION_S, ConfigError, Env
from services.common.model_overrides import model_table_from_env
from services.http_front.settings import HttpFrontSettings
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"CACHEMESH_INTERNAL_TOKEN": "t" * 32, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
SHIPPED = {**read_env_file(ROOT / ".env"), **SECRETS}


def _router(**changes: str) -> RouterSettings:
    env = Env({**SHIPPED, **changes})
    return RouterSettings.from_env(env, model_table_from_env(env))


def _refused(build: object, variable: str, value: str) -> str:
    assert callable(build)
    with pytest.raises(ConfigError) as caught:
        build(**{variable: value})
    message = str(caught.value)
    assert variable in message and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ROUTER_MODEL_TIMEOUT_S", "1e10"),  # gRPC's deadline overflowed: UNAVAILABLE at once
        ("ROUTER_SEMANTIC_TIMEOUT_S", "99999999999999999999999"),
        ("ROUTER_IDEMPOTENCY_TTL_S", "1e300"),
        ("CACHEMESH_GRACE_S", "1e300"),
        ("ROUTER_EJECT_MAX_S", "1e12"),
    ],
)
def test_a_router_duration_past_ten_years_is_refused(variable: str, value: str) -> None:
    message = _refused(_router, variable, value)
    assert f"at most {MAX_DURATION_S}" in message and "10 years" in message


def test_the_http_fronts_gateway_timeout_past_ten_years_is_refused() -> None:
    """HTTP_FRONT_GATEWAY_TIMEOUT_S=1e10 answered every request 504 in 7 ms."""

    def build(**changes: str) -> HttpFrontSettings:
        return HttpFrontSettings.from_env({**SHIPPED, **changes})

    assert "at most" in _refused(build, "HTTP_FRONT_GATEWAY_TIMEOUT_S", "1e10")
    assert build(HTTP_FRONT_GATEWAY_TIMEOUT_S=str(MAX_DURATION_S)).gateway_timeout_s > 0


def test_a_prefix_record_ttl_redis_refuses_is_refused() -> None:
    """PREFIX_CACHE_RECORD_TTL_S=99999999999999 was taken and every WARM commit then failed
    in Redis ("value is not an integer or out of range"): nothing billed."""

    def build(**changes: str) -> PrefixCacheSettings:
        return PrefixCacheSettings.from_env(Env({**SHIPPED, **changes}))

    assert "at most" in _refused(build, "PREFIX_CACHE_RECORD_TTL_S", "99999999999999")
    assert "at most" in _refused(build, "PREFIX_CACHE_PLAN_TTL_S", "99999999999999")
    assert build(PREFIX_CACHE_RECORD_TTL_S=str(MAX_DURATION_S)).record_ttl_s == MAX_DURATION_S
    assert ">= 3600" in _refused(build, "PREFIX_CACHE_RECORD_TTL_S", "60")  # its own floor


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("http://127.0.0.1:61751", "no scheme"),
        ("a b:80", "whitespace"),
        ("h:²", "ASCII digits"),  # str.isdigit() took it, int() then raised a traceback
        ("h:٨٠", "ASCII digits"),
        ("::1:80", "brackets"),
        ("h:99999", "0-65535"),
    ],
)
@pytest.mark.parametrize("variable", ["SEMANTIC_CACHE_ADDR", "PREFIX_CACHE_ADDR", "ROUTER_LISTEN"])
def test_an_address_grpc_cannot_dial_is_refused(variable: str, value: str, why: str) -> None:
    message = _refused(_router, variable, value)
    assert "host:port" in message and why in message


def test_a_model_replica_address_grpc_cannot_dial_is_refused() -> None:
    message = _refused(
        _router, "MODEL_REPLICAS", "sim-small=127.0.0.1:50054,sim-large=http://127.0.0.1:50055"
    )
    assert "host:port" in message and "no scheme" in message


def test_addresses_of_every_valid_form_are_taken() -> None:
    settings = _router(
        SEMANTIC_CACHE_ADDR="[::1]:50052",
        PREFIX_CACHE_ADDR="localhost:50053",
        ROUTER_LISTEN="0.0.0.0:0",
    )
    assert settings.semantic_cache_addr == "[::1]:50052"
    assert settings.prefix_cache_addr == "localhost:50053"


@pytest.mark.parametrize("value", ["0", "0.5"])
def test_an_idempotency_ttl_under_a_second_is_refused(value: str) -> None:
    """0 silently turned answer-once off: a retry with the same request_id was a second
    model call and a second bill."""
    message = _refused(_router, "ROUTER_IDEMPOTENCY_TTL_S", value)
    assert ">= 1 second" in message and "second bill" in message
    assert _router(ROUTER_IDEMPOTENCY_TTL_S="1").idempotency_ttl_s == 1.0


@pytest.mark.parametrize(
    "token",
    ["short", "has\ttab-0123456789abcdef", "tok\u00e9n-0123456789abcdef", "with space 0123456789"],
)
def test_the_router_refuses_an_internal_token_the_services_refuse(token: str) -> None:
    """The internal services refused such a token at start-up; the router took it, and with
    a non-ASCII one every internal call failed INTERNAL "Invalid metadata"."""
    message = _refused(_router, "CACHEMESH_INTERNAL_TOKEN", token)
    assert "printable ASCII" in message and token not in message


def test_a_message_limit_too_low_for_the_fronts_body_limit_names_the_variable_set() -> None:
    """It said "HTTP_FRONT_MAX_BODY_BYTES must be >= 1024, got 750", a variable left unset."""
    environ = {**SHIPPED, "CACHEMESH_MAX_MESSAGE_BYTES": "1500"}
    environ.pop("HTTP_FRONT_MAX_BODY_BYTES", None)
    with pytest.raises(ConfigError) as caught:
        HttpFrontSettings.from_env(environ)
    message = str(caught.value)
    assert message.startswith("CACHEMESH_MAX_MESSAGE_BYTES (1500) leaves the HTTP front")
    assert "unset" in message and "at least 2048" in message and "\n" not in message
    environ["CACHEMESH_MAX_MESSAGE_BYTES"] = "2048"
    assert HttpFrontSettings.from_env(environ).max_body_bytes == 1024
