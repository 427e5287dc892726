"""A provider's own error text never reaches a tenant with the operator's account in it.
OpenAI's rate-limit messages name the organization ("... in organization org-... on tokens
per min"), its 403s the project ("Project `proj_...` does not have access to model ..."),
Anthropic's the organization by its UUID ("... the rate limit for your organization (<uuid>)
..."). A stream broken mid-answer ends with our own words (the provider's status, its error's
type, its retry-after), which the router passes on in its "broke off" refusal; a refusal
before the first token that names the request's fault (a 400, a request alone over the
account's token rate) keeps the provider's words, its account ids taken out. The replica's
DEBUG line keeps the provider's text, the ids taken out there too. The adapter and its driver in
process against the loopback provider server, as test_provider_streams."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from services.common.errors import Code, RequestError
from tests.integration.test_provider_streams import CLAUDE, GPT, _api, _ends, _generate
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.wire_server import Reply, WireServer, dumps

ORG = "org-AbC123dEf456GhI789jKl"
PROJECT = "proj_Zy98Xw76Vu54Ts32"
ANTHROPIC_ORG = "6d5b2f3e-1a2b-4c3d-9e8f-0a1b2c3d4e5f"
WORKSPACE = "wrkspc_01AbCdEfGhIjKlMnOp"
SECRETS = (ORG, PROJECT, ANTHROPIC_ORG, WORKSPACE)
RATE_LIMITED = (
    f"Rate limit reached for gpt-4o-mini in organization {ORG} on tokens per min (TPM): "
    "Limit 200000, Used 199812, Requested 1045. Please try again in 257ms."
)


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving("sk-****")


def _clean(text: str) -> bool:
    return not any(secret in text for secret in SECRETS)


def test_an_openai_rate_limit_mid_answer_reaches_the_caller_in_our_words(
    server: WireServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.reset()
    events = openai_wire.stream(GPT, ["Paris ", "is "], None)[:-2]  # no finish, no [DONE]
    broken = openai_wire.error_event("rate_limit_exceeded", 429, RATE_LIMITED).events
    server.script("openai", Reply(events=events + broken))
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        chunks = _generate(_api(server, "openai"), GPT)
    (end,) = _ends(chunks)
    assert end.interrupted and end.output_tokens > 0
    print(f"\nend.error: {end.error!r}")
    assert _clean(end.error), end.error  # was the provider's message, its org id in it
    assert "429" in end.error and "rate_limit_exceeded" in end.error
    assert "Used 199812" not in end.error  # the account's use this minute: not the tenant's
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Rate limit reached for gpt-4o-mini in organization" in logged  # the operator's
    assert _clean(logged), logged
    # at DEBUG only (a provider's message may quote the request): above it, its identifiers
    above = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert any("429 rate_limit_exceeded" in line for line in above), above
    assert not any("Rate limit reached" in line for line in above), above


def test_an_anthropic_error_mid_answer_reaches_the_caller_in_our_words(
    server: WireServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.reset()
    usage = anthropic_wire.Usage(25, output_tokens=3)
    events = anthropic_wire.stream(CLAUDE, ["Paris ", "is "], usage, error_after=1)
    message = (
        f"This request would exceed the rate limit for your organization ({ANTHROPIC_ORG}) "
        f"of 400,000 output tokens per minute in workspace {WORKSPACE}."
    )
    error = dumps(anthropic_wire.error_body("rate_limit_error", message))
    events = [*events[:-1], ("error", error)]  # its error event in place of the overloaded one
    server.script("anthropic", Reply(events=events))
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        chunks = _generate(_api(server, "anthropic"), CLAUDE)
    (end,) = _ends(chunks)
    assert end.interrupted
    print(f"\nend.error: {end.error!r}")
    assert _clean(end.error), end.error
    assert "rate_limit_error" in end.error
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "would exceed the rate limit" in logged and _clean(logged), logged
    above = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert above and not any("would exceed the rate limit" in line for line in above), above


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (
            openai_wire.error(
                429,
                "tokens",
                f"Request too large for gpt-4o-mini in organization {ORG} on tokens per min "
                "(TPM): Limit 30000, Requested 45000. The input or output tokens must be "
                "reduced in order to run successfully.",
                code="rate_limit_exceeded",
            ),
            Code.RESOURCE_EXHAUSTED,
        ),
        (
            openai_wire.error(
                403,
                "invalid_request_error",
                f"Project `{PROJECT}` does not have access to model `gpt-4o-mini`",
                code="model_not_found",
            ),
            Code.UNAVAILABLE,  # this replica's key may not use it: the next replica's turn
        ),
        (
            openai_wire.error(
                400,
                "invalid_request_error",
                f"Your organization {ORG} must be verified to stream this model.",
                code="unsupported_value",
            ),
            Code.INVALID_ARGUMENT,
        ),
    ],
    ids=["too-large-for-the-rate", "project-without-the-model", "unverified-org"],
)
def test_a_refusal_before_the_first_token_names_no_account(
    server: WireServer, reply: Reply, code: Code
) -> None:
    server.reset()
    server.script("openai", reply)
    with pytest.raises(RequestError) as caught:
        _generate(_api(server, "openai"), GPT)
    refused = caught.value
    print(f"\n{refused.code.name}: {refused.message!r}")
    assert refused.code == code
    assert _clean(refused.message) and _clean(refused.reason), refused.message


def test_an_unknown_error_event_quoting_the_prompt_is_in_no_line_above_debug(
    server: WireServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An engine's error event before any token, of a type no rule knows (FATAL, no HTTP
    status) and quoting the prompt: the replica's lines above DEBUG name its identifiers only.
    Before, it was taken for an unexpected failure and its traceback, the provider's message
    in it, logged at ERROR."""
    server.reset()
    marker = "marker-9b1e0c6d"
    server.script("openai", openai_wire.error_event("parse_failure", "x", f"cannot read {marker}"))
    with (
        caplog.at_level(logging.DEBUG, logger="cachemesh.model"),
        pytest.raises(RequestError) as refused,
    ):
        _generate(_api(server, "openai"), GPT)
    assert refused.value.code == Code.UNAVAILABLE, refused.value
    above = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert above and not [line for line in above if marker in line], above
    assert marker not in refused.value.message + refused.value.reason
    assert any(marker in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
