"""Provider settings and table overrides, validated at start-up; the request bodies each
adapter builds; a key never in a message."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.env import ConfigError, Env, redacted_url
from services.common.model_overrides import model_table_from_env
from services.common.models import load_model_table
from services.model.providers.config import ProviderSettings
from services.model.providers.failures import (
    ESTIMATE_MARGIN,
    Failure,
    Kind,
    Over,
    _kind,
    alone_over,
    classify,
    over,
)
from services.model.providers.openai_wire import chat_params
from services.model.providers.redact import Redactor
from services.model.settings import ModelSettings

TABLE = load_model_table()
KEY = "sk-ant-api03-secretsecretsecret-XYZ123"


def test_the_key_comes_from_a_file_and_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    settings = ProviderSettings.from_env(Env({"ANTHROPIC_API_KEY_FILE": str(path)}), "anthropic")
    assert settings.api_key is not None and settings.api_key.reveal() == KEY
    assert KEY not in repr(settings) and KEY not in str(settings.api_key)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "ANTHROPIC_API_KEY"),  # Anthropic always needs a key
        ({"ANTHROPIC_API_KEY": "a", "ANTHROPIC_API_KEY_FILE": "/x"}, "not both"),
        ({"ANTHROPIC_API_KEY_FILE": "/nonexistent/key"}, "ANTHROPIC_API_KEY_FILE"),
        ({"ANTHROPIC_API_KEY": "a", "ANTHROPIC_BASE_URL": "ftp://x"}, "ANTHROPIC_BASE_URL"),
        ({"ANTHROPIC_API_KEY": "a", "PROVIDER_MAX_RETRIES": "-1"}, "PROVIDER_MAX_RETRIES"),
    ],
)
def test_bad_provider_settings_fail_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ProviderSettings.from_env(Env(env), "anthropic")


def test_a_local_engine_needs_no_key_but_openai_does() -> None:
    local = ProviderSettings.from_env(
        Env({"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1"}), "openai"
    )
    assert local.api_key is None
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        ProviderSettings.from_env(Env({}), "openai")


def test_a_replica_serves_only_its_backends_models() -> None:
    base = {"CACHEMESH_INTERNAL_TOKEN": "t" * 20, "ANTHROPIC_API_KEY": "k"}
    with pytest.raises(ConfigError, match="MODEL_BACKEND=anthropic serves"):
        ModelSettings.from_env({**base, "MODEL_BACKEND": "anthropic", "MODEL_IDS": "gpt-4o"})
    with pytest.raises(ConfigError, match="MODEL_BACKEND"):
        ModelSettings.from_env({**base, "MODEL_BACKEND": "bedrock"})
    ok = ModelSettings.from_env(
        {**base, "MODEL_BACKEND": "anthropic", "MODEL_IDS": "claude-haiku-4-5"}
    )
    assert ok.provider is not None and ok.provider.base_url == "https://api.anthropic.com"


def test_upstream_ids_rename_the_served_models_and_a_key_not_in_the_table_is_refused() -> None:
    """``MODEL_UPSTREAM_IDS`` is applied to the served models by the settings (what the start-up
    line prints is what the adapter sends); a key that is no model of the table (a typo) is
    refused at start-up, naming it: the replica started, sent the table's id, and the engine
    refused every request (404, INVALID_ARGUMENT) while it stayed SERVING."""
    base = {
        "CACHEMESH_INTERNAL_TOKEN": "t" * 20,
        "MODEL_BACKEND": "openai",
        "OPENAI_BASE_URL": "http://127.0.0.1:8080/v1",
        "MODEL_IDS": "local-small",
    }
    # local-large is served by another replica sharing the variable (model-2): fine
    upstream = "local-small=SmolLM2-135M-Instruct,local-large=Qwen/Qwen2.5-1.5B-Instruct"
    settings = ModelSettings.from_env({**base, "MODEL_UPSTREAM_IDS": upstream})
    assert settings.models["local-small"].upstream == "SmolLM2-135M-Instruct"
    assert list(settings.models) == ["local-small"]
    typo = "local_small=SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match="MODEL_UPSTREAM_IDS: 'local_small' is not"):
        ModelSettings.from_env({**base, "MODEL_UPSTREAM_IDS": typo})


def test_prices_and_auto_tiers_from_the_environment() -> None:
    table = model_table_from_env(
        Env({"CACHEMESH_PRICES": "local-small=7/9/1", "CACHEMESH_AUTO_SMALL": "local-small"})
    )
    spec = table.models["local-small"]
    assert (spec.input_nanos, spec.output_nanos, spec.cache_read_nanos) == (7, 9, 1)
    assert table.auto["small"] == "local-small"
    with pytest.raises(ConfigError, match="CACHEMESH_AUTO"):
        model_table_from_env(Env({"CACHEMESH_AUTO_SMALL": "claude-sonnet-4-5"}))  # a large model
    with pytest.raises(ConfigError, match="CACHEMESH_PRICES"):
        model_table_from_env(Env({"CACHEMESH_PRICES": "local-small=1"}))


def test_own_prices_keep_the_cache_prices_ratio_to_the_input_price() -> None:
    # a contract price for Sonnet: the 5-minute write stayed at 3750 for an input of 6000, so
    # every cache write was billed below the uncached price (and shown as a saving)
    table = model_table_from_env(Env({"CACHEMESH_PRICES": "claude-sonnet-4-5=6000/22500/600"}))
    spec = table.models["claude-sonnet-4-5"]
    assert (spec.cache_write_5m_nanos, spec.cache_write_1h_nanos) == (7500, 12000)  # 1.25x, 2x
    assert spec.cache_read_nanos == 600  # given: kept as given
    read_scaled = model_table_from_env(Env({"CACHEMESH_PRICES": "claude-sonnet-4-5=6000/22500"}))
    assert read_scaled.models["claude-sonnet-4-5"].cache_read_nanos == 600  # 0.1x, as the row
    openai = model_table_from_env(Env({"CACHEMESH_PRICES": "gpt-4o-mini=300/1200"}))
    base = TABLE.models["gpt-4o-mini"]
    assert openai.models["gpt-4o-mini"].cache_read_nanos == round(
        base.cache_read_nanos * 300 / base.input_nanos
    )


def test_every_real_row_names_its_upstream_model_and_source() -> None:
    for spec in TABLE.models.values():
        if spec.provider in ("anthropic", "openai"):
            assert spec.upstream_id and "https://" in spec.source, spec.id
        if spec.provider == "openai":
            assert spec.max_tokens_param == "max_completion_tokens", spec.id


def test_openai_body_for_a_local_engine_uses_max_tokens_and_no_cache_key() -> None:
    spec = TABLE.models["local-small"].model_copy(update={"upstream_id": "SmolLM2-135M-Instruct"})
    request = pb.CompleteRequest(
        model="local-small",
        max_tokens=32,
        system=[pb.ContentBlock(text="Be brief.", cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi")])],
    )
    assert chat_params(spec, request) == {
        "model": "SmolLM2-135M-Instruct",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 32,
    }


@pytest.mark.parametrize(
    ("status", "error_type", "code", "kind"),
    [
        (429, "rate_limit_error", "", Kind.RETRY),
        (529, "overloaded_error", "", Kind.RETRY),
        (0, "overloaded_error", "", Kind.RETRY),  # an error event mid-stream
        (503, "error", "", Kind.RETRY),
        (400, "invalid_request_error", "", Kind.CLIENT),
        (401, "invalid_request_error", "", Kind.AUTH),  # OpenAI's 401 body says invalid_request
        (403, "permission_error", "", Kind.AUTH),
        (401, "error", "", Kind.AUTH),  # a proxy's 401 without a typed body
        (0, "authentication_error", "", Kind.AUTH),  # an error event mid-stream
        (403, "invalid_request_error", "model_not_found", Kind.FATAL),  # OpenAI: one model's key
        # OpenAI: this account's key, from where the replica runs; another replica may serve
        (403, "request_forbidden", "unsupported_country_region_territory", Kind.FATAL),
        (403, "error", "", Kind.FATAL),  # a 403 about no one model: the replica's
        (402, "billing_error", "", Kind.ACCOUNT),  # Anthropic: the account's billing
        (429, "insufficient_quota", "insufficient_quota", Kind.ACCOUNT),  # OpenAI: no quota
    ],
)
def test_failures_are_classified(status: int, error_type: str, code: str, kind: Kind) -> None:
    assert _kind(status, error_type, code) == kind


# OpenAI's (and Groq's) own words for a request over the account's token rate by itself
TPM_ALONE = (
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Requested 45000. The input or output tokens must be reduced in order to run successfully."
)
GROQ_ALONE = (
    "Request too large for model `llama-3.1-8b-instant` in organization `org_x` service tier "
    "`on_demand` on tokens per minute (TPM): Limit 6000, Requested 6294, please reduce your "
    "message size and try again."
)


@pytest.mark.parametrize(
    ("status", "error_type", "code", "message", "kind"),
    [
        (429, "tokens", "rate_limit_exceeded", TPM_ALONE, Kind.TOO_LARGE),
        # the same figures without the words, and the words without figures
        (429, "tokens", "rate_limit_exceeded", "Limit: 30,000. Requested: 45,000.", Kind.TOO_LARGE),
        (429, "error", "", "request too large for this organization's limit", Kind.TOO_LARGE),
        (0, "tokens", "rate_limit_exceeded", TPM_ALONE, Kind.TOO_LARGE),  # in a stream
        (413, "tokens", "rate_limit_exceeded", GROQ_ALONE, Kind.TOO_LARGE),
        # reached by the minute's other requests: a wait makes it pass
        (
            429,
            "tokens",
            "rate_limit_exceeded",
            "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29000, "
            "Requested 2000. Please try again in 2s.",
            Kind.RETRY,
        ),
        (
            429,
            "rate_limit_error",
            "",
            "This request would exceed the rate limit for your organization of 30,000 input "
            "tokens per minute.",
            Kind.RETRY,
        ),
        (429, "insufficient_quota", "insufficient_quota", TPM_ALONE, Kind.ACCOUNT),
        # a 404 about the model: OpenAI's, Anthropic's, vLLM's, Ollama's (typed api_error): the
        # replica's set-up (a caller names a row of the table, never the provider's model)
        (
            404,
            "invalid_request_error",
            "model_not_found",
            "The model `x` does not exist",
            Kind.FATAL,
        ),
        (404, "not_found_error", "", "model: claude-sonnet-4-x", Kind.FATAL),
        (404, "NotFoundError", "404", "The model `Qwen2.5` does not exist.", Kind.FATAL),
        (404, "api_error", "", 'model "llama3" not found, try pulling it first', Kind.FATAL),
        # any other 404: the replica's base URL or path
        (404, "error", "", '{"detail": "Not Found"}', Kind.FATAL),
        (404, "not_found_error", "", "Not Found", Kind.FATAL),
        (404, "error", "", "<html><body>404 page not found</body></html>", Kind.FATAL),
        (0, "not_found_error", "", "Not Found", Kind.FATAL),  # an error event
    ],
)
def test_failures_are_classified_by_their_message(
    status: int, error_type: str, code: str, message: str, kind: Kind
) -> None:
    assert _kind(status, error_type, code, message) == kind


@pytest.mark.parametrize(
    ("status", "error_type", "message", "what"),
    [
        (429, "tokens", TPM_ALONE, Over.TOKEN_RATE),
        (413, "tokens", GROQ_ALONE, Over.TOKEN_RATE),
        (
            413,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
            Over.SIZE_LIMIT,
        ),
        (413, "error", "Request too large", Over.SIZE_LIMIT),  # a proxy's: no limit named
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            Over.CONTEXT_WINDOW,
        ),
    ],
)
def test_what_a_request_too_large_is_over(
    status: int, error_type: str, message: str, what: Over
) -> None:
    assert over(Failure(Kind.TOO_LARGE, status, error_type, message, None)) == what


ANTHROPIC_ITPM = (
    "This request would exceed the rate limit for your organization (org-x) of 30,000 input "
    "tokens per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. "
    "Please reduce the prompt length or the maximum tokens requested, or try again later."
)


def _status_error(
    backend: str, status: int, body: Mapping[str, object], headers: dict[str, str]
) -> Exception:
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/messages")
    response = httpx2.Response(status, headers=headers, json=body, request=request)
    if backend == "anthropic":
        return anthropic.APIStatusError("refused", response=response, body=body)
    return openai.APIStatusError("refused", response=response, body=body)


def _anthropic(status: int, kind: str, message: str, headers: dict[str, str]) -> Exception:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return _status_error("anthropic", status, body, headers)


@pytest.mark.parametrize(
    ("exc", "limit"),
    [
        # the header first (Anthropic's input limit), else the message's figure
        (_anthropic(429, "rate_limit_error", ANTHROPIC_ITPM, {}), 30_000),
        (
            _anthropic(
                429,
                "rate_limit_error",
                ANTHROPIC_ITPM,
                {
                    "anthropic-ratelimit-input-tokens-limit": "40000",
                    # the most restrictive limit in effect, here the output's: never taken
                    "anthropic-ratelimit-tokens-limit": "8000",
                },
            ),
            40_000,
        ),
        (
            _anthropic(
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
                {"anthropic-ratelimit-tokens-limit": "8000"},
            ),
            None,
        ),
        (
            _anthropic(429, "rate_limit_error", "of 500,000 input tokens per day", {"x": "1"}),
            500_000,
        ),
        (
            _anthropic(
                429, "rate_limit_error", "slow", {"anthropic-ratelimit-input-tokens-limit": "x"}
            ),
            None,  # not a figure
        ),
        # OpenAI's header, when its message does not count the request itself
        (
            _status_error(
                "openai",
                429,
                {"error": {"message": "Rate limit exceeded", "type": "tokens"}},
                {"x-ratelimit-limit-tokens": "30000"},
            ),
            30_000,
        ),
        (
            _status_error(
                "openai",
                429,
                {
                    "error": {
                        "message": "Rate limit reached ... Limit 30000, Used 29000, Requested "
                        "2000.",
                        "type": "tokens",
                    }
                },
                {"x-ratelimit-limit-tokens": "30000"},
            ),
            None,  # the provider's own count decided: a wait passes it
        ),
        # no rate limit: an overload, a 400
        (_anthropic(529, "overloaded_error", ANTHROPIC_ITPM, {}), None),
        (_anthropic(400, "invalid_request_error", ANTHROPIC_ITPM, {}), None),
    ],
)
def test_a_rate_limits_token_limit_is_read_from_its_headers_else_its_words(
    exc: Exception, limit: int | None
) -> None:
    assert classify(exc).token_limit == limit


def test_a_request_alone_over_the_token_limit_past_the_margin_is_too_large() -> None:
    """Our count is an estimate (cl100k_base, not Claude's tokenizer): over the limit by less
    than the margin, the rate limit is retried as before."""
    failure = classify(_anthropic(429, "rate_limit_error", ANTHROPIC_ITPM, {}))
    assert failure.kind == Kind.RETRY
    assert alone_over(failure, 56_000).kind == Kind.TOO_LARGE
    assert alone_over(failure, 56_000).request_tokens == 56_000
    assert over(alone_over(failure, 56_000)) == Over.TOKEN_RATE
    assert alone_over(failure, int(30_000 * ESTIMATE_MARGIN)) == failure
    assert alone_over(failure, 29_000) == failure
    no_limit = classify(_anthropic(429, "rate_limit_error", "slow down", {}))
    assert alone_over(no_limit, 10**9) == no_limit


def test_only_anthropics_own_no_credit_message_is_the_accounts() -> None:
    """Anthropic types an account without credit as the request's (400
    ``invalid_request_error``): its message tells it, at its start; a message that only quotes
    the words (from the request, a tool's name say) is still the request's."""
    no_credit = "Your credit balance is too low to access the Anthropic API. Please go to Plans"
    assert _kind(400, "invalid_request_error", "", no_credit) == Kind.ACCOUNT
    quoted = f"tools.0.name: String should match pattern; got '{no_credit[:30]}'"
    assert _kind(400, "invalid_request_error", "", quoted) == Kind.CLIENT


def test_a_key_echoed_whole_or_masked_is_redacted() -> None:
    redactor = Redactor([KEY])
    for echo in (KEY, KEY[:8] + "****" + KEY[-4:], "sk-proj-abc*****wxyz"):
        cleaned = redactor.clean(f"Incorrect API key provided: {echo}.")
        assert KEY not in cleaned and KEY[:8] not in cleaned and "abc*****" not in cleaned
    assert json.dumps(redactor.message("x" * 2000)).count("x") == 500


PROJECT_KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYzQ"
PLAIN_KEY = "abcd1234efgh5678ijklmnop"  # an engine's own key: no sk- shape


@pytest.mark.parametrize(
    ("key", "echo"),
    [
        (PROJECT_KEY, "sk-proj-AbCd****xYzQ"),  # the key's head first in it: broke its shape
        (PROJECT_KEY, "sk-proj-****************************xYzQ"),
        (PROJECT_KEY, "sk-proj-AbCd...xYzQ"),
        (PROJECT_KEY, "sk-proj-AbCdEfGh"),  # its head, cut
        (PROJECT_KEY, "...MnOpQrStUvWxYzQ"),  # its tail
        (PLAIN_KEY, "abcd1234****mnop"),
        (PLAIN_KEY, "abcd****mnop"),  # too short a head and tail to find, but masked
        (PLAIN_KEY, "abcd...mnop"),
        (PLAIN_KEY, "abcd1234efgh"),
    ],
)
def test_nothing_of_a_key_or_its_masked_form_survives(key: str, echo: str) -> None:
    """Whichever part of the key a provider echoes, and in whichever order the rules apply:
    before, the exact head's replacement first turned ``sk-proj-AbCd****xYzQ`` into
    ``[redacted]AbCd****xYzQ``, which the key-shape rule no longer saw."""
    cleaned = Redactor([key]).clean(f"Incorrect API key provided: {echo}. Find your key at x.")
    assert cleaned == "Incorrect API key provided: [redacted] Find your key at x.", cleaned


BASE64_KEY = "Zm9v+YmFy/YmF6cXV4eHl6enk0Mg=="  # a proxy's or an engine's: '+', '/', '='


@pytest.mark.parametrize(
    "echo",
    [
        "Zm9v+YmFy/YmF6cXV4...",  # its head, cut: 18 of its 28 characters reached the line
        "...eHl6enk0Mg==",  # its tail
        "Zm9v+YmFy/YmF6cXV4eHl6",
        "Zm9v+Y...enk0Mg==",  # masked
        "Zm9v****Mg==",
    ],
)
def test_nothing_of_a_base64_key_survives(echo: str) -> None:
    """A key's run was split at '+', '/' and '=': no piece held its 8-character head or
    6-character tail, and the pieces reached the 401/403 ERROR line unchanged."""
    cleaned = Redactor([BASE64_KEY]).clean(f"Invalid key {echo} (check it)")
    assert cleaned == "Invalid key [redacted] (check it)", cleaned


def test_a_masked_key_after_an_equals_sign_or_slash_is_still_found() -> None:
    for text in ("key=abcd...mnop", "keys/abcd****mnop"):
        cleaned = Redactor([PLAIN_KEY]).clean(text)
        assert cleaned.endswith("[redacted]") and "mnop" not in cleaned, cleaned


def test_a_mask_alone_or_words_around_a_key_are_kept() -> None:
    redactor = Redactor([PLAIN_KEY])
    for text in ("a **bold** word", "wait... then retry", "count: 5 of 10"):
        assert redactor.clean(text) == text
    assert redactor.clean(f"forbidden_for_{PLAIN_KEY}") == "forbidden_for_[redacted]"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://vllm:S3cret@127.0.0.1:8000/v1", "http://vllm:***@127.0.0.1:8000/v1"),
        ("https://S3cret@engine.example/v1", "https://***@engine.example/v1"),  # a token as user
        ("https://S3cret:@engine.example/v1", "https://***@engine.example/v1"),  # empty password
        ("https://api.openai.com/v1?key=S3cret#S3cret", "https://api.openai.com/v1"),
        ("http://u:S3cret@[::1]:8080/v1", "http://u:***@[::1]:8080/v1"),
        ("http://u:12/S3cret@host/v1", "http://u:12/***"),  # a '/' in the password
        ("http://u:S3cret?b@host/v1", "(a http URL that does not parse; not shown)"),
        ("u:S3cret@host/v1", "(not a scheme://host URL; not shown)"),
    ],
)
def test_a_base_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ANTHROPIC_BASE_URL": "https://u:S3cret@proxy.example"}, "ANTHROPIC_API_KEY"),
        ({"ANTHROPIC_API_KEY": "a", "ANTHROPIC_BASE_URL": "ftp://u:S3cret@x"}, "BASE_URL"),
    ],
)
def test_a_config_error_never_shows_the_base_urls_password(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        ProviderSettings.from_env(Env(env), "anthropic")
    assert "S3cret" not in str(caught.value) and "u:***@" in str(caught.value)


def test_the_base_urls_password_is_redacted_from_provider_messages() -> None:
    settings = ProviderSettings.from_env(
        Env({"OPENAI_BASE_URL": "http://vllm:S3cretPassw0rd@127.0.0.1:9/v1"}), "openai"
    )
    cleaned = Redactor(settings.secrets()).clean("cannot reach vllm:S3cretPassw0rd@127.0.0.1")
    assert "S3cretPassw0rd" not in cleaned


@pytest.mark.parametrize(
    ("credentials", "secrets"),
    [
        ("vllm:S3cret%40Passw0rd@", ["S3cret%40Passw0rd", "S3cret@Passw0rd"]),  # as sent, decoded
        ("tok-S3cretToken@", ["tok-S3cretToken"]),  # a token as the lone user name
        ("tok-S3cretToken:@", ["tok-S3cretToken"]),  # ... with an empty password
    ],
)
def test_the_base_urls_credential_is_a_secret(credentials: str, secrets: list[str]) -> None:
    env = Env({"OPENAI_BASE_URL": f"http://{credentials}127.0.0.1:9/v1", "OPENAI_API_KEY": KEY})
    settings = ProviderSettings.from_env(env, "openai")
    assert settings.secrets() == [KEY, *secrets]
    cleaned = Redactor(settings.secrets()).clean(f"cannot reach {credentials}127.0.0.1")
    assert all(secret not in cleaned for secret in secrets)


def test_own_prices_keep_the_long_context_rates_ratio_to_the_prices() -> None:
    # GPT-5.4 at the Batch API's half price: over 272K it is still 2x input, 1.5x output
    table = model_table_from_env(Env({"CACHEMESH_PRICES": "gpt-5-4=1250/7500/125"}))
    long = table.models["gpt-5-4"].long_context
    assert long is not None and long.above_tokens == 272_000
    assert (long.input_nanos, long.output_nanos, long.cache_read_nanos) == (2500, 11250, 250)


@pytest.mark.parametrize("given", ["direct", "file"])
def test_a_key_with_a_space_is_refused_naming_the_variable_not_the_key(
    tmp_path: Path, given: str
) -> None:
    spaced = "sk-ant-api03 secret"
    path = tmp_path / "key"
    path.write_text(spaced + "\n")
    env = (
        {"ANTHROPIC_API_KEY": spaced}
        if given == "direct"
        else {"ANTHROPIC_API_KEY_FILE": str(path)}
    )
    named = "ANTHROPIC_API_KEY" if given == "direct" else "ANTHROPIC_API_KEY_FILE"
    with pytest.raises(ConfigError, match=f"^{named}: must be one key") as caught:
        ProviderSettings.from_env(Env(env), "anthropic")
    assert "secret" not in str(caught.value)


def test_a_key_file_too_large_to_be_a_key_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"x" * (1 << 20))
    with pytest.raises(ConfigError, match=r"ANTHROPIC_API_KEY_FILE: .* is larger than"):
        ProviderSettings.from_env(Env({"ANTHROPIC_API_KEY_FILE": str(path)}), "anthropic")


def test_only_the_providers_own_url_is_its_own() -> None:
    """Where a 401/403's words may go on the operator's line (``failures.for_the_operator``)."""
    key = {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant-x"}
    assert ProviderSettings.from_env(Env(key), "openai").at_the_providers_own_url
    assert ProviderSettings.from_env(Env(key), "anthropic").at_the_providers_own_url
    for url in ("https://openrouter.ai/api/v1", "http://127.0.0.1:8080/v1"):
        env = Env({**key, "OPENAI_BASE_URL": url})
        assert not ProviderSettings.from_env(env, "openai").at_the_providers_own_url
