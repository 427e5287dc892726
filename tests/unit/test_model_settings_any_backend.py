"""Every setting a model replica reads is parsed and checked whatever its backend: a simulated
replica took MODEL_MAX_CONCURRENT_CALLS=abc, PROVIDER_MAX_RETRIES=-5, PROVIDER_BACKOFF_S=nan
and both ANTHROPIC_API_KEY and ANTHROPIC_API_KEY_FILE, and the typo surfaced only when the
backend was switched. A malformed one is refused naming the variable (a secret never shown);
one set that the backend does not read is named in a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.common.env import ConfigError
from services.model.settings import ModelSettings

BASE = {"CACHEMESH_INTERNAL_TOKEN": "t" * 32}
KEY = "sk-ant-api03-secretsecretsecret-XYZ123"
BACKENDS = {
    "simulated": {},
    "anthropic": {"MODEL_IDS": "claude-haiku-4-5", "ANTHROPIC_API_KEY": KEY},
    "openai": {"MODEL_IDS": "local-small", "OPENAI_BASE_URL": "http://127.0.0.1:8080/v1"},
}


def _settings(backend: str, **extra: str) -> ModelSettings:
    return ModelSettings.from_env({**BASE, "MODEL_BACKEND": backend, **BACKENDS[backend], **extra})


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MODEL_MAX_CONCURRENT_CALLS", "abc", "MODEL_MAX_CONCURRENT_CALLS must be"),
        ("MODEL_MAX_CONCURRENT_CALLS", "10001", "MODEL_MAX_CONCURRENT_CALLS"),
        ("PROVIDER_MAX_RETRIES", "-5", "PROVIDER_MAX_RETRIES"),
        ("PROVIDER_BACKOFF_S", "nan", "PROVIDER_BACKOFF_S"),
        ("PROVIDER_BACKOFF_MAX_S", "soon", "PROVIDER_BACKOFF_MAX_S"),
        ("PROVIDER_AUTH_RECHECK_S", "-1", "PROVIDER_AUTH_RECHECK_S"),
        ("MODEL_UPSTREAM_IDS", "local-small", "MODEL_UPSTREAM_IDS: expected model=upstream-id"),
        ("MODEL_UPSTREAM_IDS", "no-such-row=x", "MODEL_UPSTREAM_IDS: 'no-such-row' is not"),
        ("ANTHROPIC_BASE_URL", "ftp://x", "ANTHROPIC_BASE_URL must be an http"),
        ("OPENAI_BASE_URL", "api.openai.com/v1", "OPENAI_BASE_URL must be an http"),
        ("OPENAI_API_KEY_FILE", "/nonexistent/key", "OPENAI_API_KEY_FILE"),
    ],
)
def test_a_malformed_setting_is_refused_whatever_the_backend(
    backend: str, variable: str, value: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        _settings(backend, **{variable: value})


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("prefix", ["ANTHROPIC", "OPENAI"])
def test_a_key_given_both_ways_is_refused_and_never_shown(
    backend: str, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    env = {f"{prefix}_API_KEY": KEY, f"{prefix}_API_KEY_FILE": str(path)}
    with pytest.raises(ConfigError, match=f"set {prefix}_API_KEY_FILE or {prefix}_API_KEY") as e:
        _settings(backend, **env)
    assert KEY not in str(e.value)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_key_with_a_space_is_refused_whatever_the_backend(backend: str) -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY: must be one key") as e:
        _settings(backend, OPENAI_API_KEY="sk-proj-abc def")
    assert "abc def" not in str(e.value)


def test_a_simulated_replica_names_the_provider_settings_it_does_not_read() -> None:
    settings = _settings(
        "simulated",
        ANTHROPIC_API_KEY=KEY,
        PROVIDER_MAX_RETRIES="3",
        MODEL_MAX_CONCURRENT_CALLS="4",
    )
    assert settings.provider is None and settings.max_concurrent_calls == 0
    assert settings.unused == ("MODEL_MAX_CONCURRENT_CALLS", "ANTHROPIC_API_KEY",
                               "PROVIDER_MAX_RETRIES")  # fmt: skip
    assert _settings("simulated").unused == ()  # nothing set: nothing to say


def test_a_provider_replica_names_the_other_providers_settings() -> None:
    openai = _settings("openai", ANTHROPIC_BASE_URL="https://api.anthropic.com", OPENAI_API_KEY="k")
    assert openai.unused == ("ANTHROPIC_BASE_URL",)
    anthropic = _settings("anthropic", OPENAI_API_KEY="sk-x", PROVIDER_MAX_RETRIES="3")
    assert anthropic.unused == ("OPENAI_API_KEY",)  # PROVIDER_* is its own


def test_the_shipped_env_leaves_a_simulated_replica_nothing_unused() -> None:
    from cachemesh.envfile import read_env_file
    from tests.unit.test_documented_settings import ROOT

    shipped = read_env_file(ROOT / ".env")
    assert ModelSettings.from_env({**shipped, **BASE}).unused == ()


def test_the_start_up_warns_naming_the_unused_settings_not_their_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from services.model.app import warn_unused

    settings = _settings("simulated", ANTHROPIC_API_KEY=KEY)
    with caplog.at_level(logging.WARNING, logger="cachemesh.model"):
        warn_unused(settings)
    [record] = caplog.records
    assert "ANTHROPIC_API_KEY" in record.getMessage() and "simulated" in record.getMessage()
    assert KEY not in record.getMessage()
