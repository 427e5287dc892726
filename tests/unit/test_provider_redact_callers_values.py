"""A provider's message is redacted of the operator's credentials and account ids, not of the
caller's own values: a 400 that names a field or an id the caller sent is what the caller needs
to fix its request. Before, the key-shape rule took any ``api_`` / ``key_`` / ``key-`` word of
6+ characters (a schema's ``api_version``, ``key_points``), and the account rule any UUID (a
``tool_use_id``) and any ``user-`` id of 16+ characters (a caller's ``metadata.user_id``)."""

from __future__ import annotations

import pytest

from services.model.providers.redact import REDACTED, Redactor

KEY = "sk-proj-loopbackKEY0123456789abcdef"
UUID = "3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e"


@pytest.mark.parametrize(
    "text",
    [
        "Invalid schema for function 'lookup': In context=('properties', 'api_version'), "
        "'additionalProperties' is required to be supplied and to be false.",
        "tools.0.custom.input_schema: property 'key_points' is invalid: JSON schema is invalid",
        "tools.1.input_schema: property 'api-endpoint-url' is invalid",
        f"messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: {UUID}. "
        "Each `tool_result` block must have a corresponding `tool_use` block in the previous "
        "message.",
        "metadata.user_id: user-8f3a2b1c9d0e4f5a6b7c is not a valid id",
    ],
    ids=["api_version", "key_points", "api-endpoint-url", "tool_use_id", "metadata.user_id"],
)
def test_a_callers_own_value_in_a_400_is_kept(text: str) -> None:
    assert Redactor([KEY]).message(text) == text


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        (
            f"This request would exceed the rate limit for your organization ({UUID}) of "
            "1,000 input tokens per minute.",
            UUID,
        ),
        (f"The workspace {UUID} has reached its spend limit", UUID),
        ("user user-AbCdEfGhIjKlMnOpQrStUvWx is not allowed", "user-AbCdEfGhIjKlMnOpQrStUvWx"),
        (
            "Rate limit reached for gpt-4o-mini in organization org-AbC123dEf456GhI789jKl on "
            "tokens per min (TPM)",
            "org-AbC123dEf456GhI789jKl",
        ),
        ("Project `proj_Zy98Xw76Vu54Ts32AbCd` has no access", "proj_Zy98Xw76Vu54Ts32AbCd"),
        ("Incorrect API key provided: sk-other-tenantkey.", "sk-other-tenantkey"),
        ("Incorrect API key provided: sk-ant-api03-AbCd.", "sk-ant-api03-AbCd"),
        ("Invalid key: key-3f9a****b7c2", "key-3f9a****b7c2"),
        ("Invalid key: api_9f8e7d6c5b4a3f2e1d0c9b8a", "api_9f8e7d6c5b4a3f2e1d0c9b8a"),
        (f"Resource: /subscriptions/{UUID}/resourceGroups/rg", UUID),
    ],
    ids=[
        "anthropic-org",
        "workspace",
        "openai-user",
        "openai-org",
        "openai-project",
        "sk-",
        "sk-ant-",
        "masked-key-",
        "key-like-api_",
        "azure-subscription",
    ],
)
def test_the_operators_ids_and_keys_are_still_hidden(text: str, hidden: str) -> None:
    cleaned = Redactor([KEY]).message(text)
    assert hidden not in cleaned and REDACTED in cleaned, cleaned
