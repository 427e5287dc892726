"""Whose fault a provider's refusal is, from the provider's own wire body through the official
SDK: the request's (``INVALID_ARGUMENT``, for the client to fix, no other replica tried), or
the replica's account's (``UNAVAILABLE``: the router hands the request to another replica or
tier and counts it towards the replica's ejection). The replica is built as ``serve()``
builds it and calls the loopback provider servers of ``tests.providers``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from unittest import mock

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.model.providers.config import Backend, ProviderSettings
from tests.providers import anthropic_wire, openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import Reply, WireServer

CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-4-1"
RECHECK_S = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


@pytest.fixture
async def replicas(server: WireServer) -> AsyncIterator[Callable[[Backend, str], Replica]]:
    """Builds replicas on ``server`` (closed after the test)."""
    built: list[Replica] = []

    def build(backend: Backend, model: str) -> Replica:
        built.append(Replica(server, backend, model))
        return built[-1]

    yield build
    for replica in built:
        await replica.api.close()


class Replica:
    """A provider replica on ``server``; its clock moves only when the test moves it."""

    def __init__(self, server: WireServer, backend: Backend, model: str) -> None:
        server.reset()
        self.server, self.backend, self.model = server, backend, model
        self.now = 1000.0
        self.health: list[bool] = []
        self.waits: list[float] = []  # each wait before a retry: the clock moves by it
        base = server.base + ("/v1" if backend == "openai" else "")
        key = f"sk-{backend}-loopback-0123456789abcdef"
        settings = provider_settings(backend, base, key, max_retries=3, auth_recheck_s=RECHECK_S)

        async def set_health(serving: bool) -> None:
            self.health.append(serving)

        async def sleep(seconds: float) -> None:
            self.waits.append(seconds)
            self.now += seconds

        self.api = provider_replica(
            settings, [model], set_health=set_health, clock=lambda: self.now, sleep=sleep
        )

    async def call(
        self,
        text: str = "Capital?",
        *,
        planned_tokens: int | None = None,
        cached_system: str = "",
    ) -> RequestError | None:
        """One request (``text`` the user's message; ``planned_tokens``: Plan's count of the
        prompt, else none sent; ``cached_system``: a system block ending in a cache
        breakpoint); the refusal it got, else None (answered)."""
        message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])
        request = pb.CompleteRequest(model=self.model, max_tokens=16, messages=[message])
        if cached_system:
            request.system.append(
                pb.ContentBlock(text=cached_system, cache_control=pb.CacheControl())
            )
        call = model_pb2.GenerateRequest(tenant="t", model=self.model, request=request)
        if planned_tokens is not None:
            call.prompt.prompt_tokens = planned_tokens
        try:
            chunks = [chunk async for chunk in self.api.generate(call, 10.0)]
        except RequestError as refused:
            return refused
        assert chunks[-1].end.stop_reason == "end_turn"
        return None

    def calls(self) -> int:
        """How many calls reached the provider."""
        return len(self.server.seen_by(self.backend))


# OpenAI's 403 when the account's key may not be used from where the replica runs
REGION = openai_wire.error(
    403,
    "request_forbidden",
    "Country, region, or territory not supported",
    code="unsupported_country_region_territory",
)
# OpenAI's 403 when the key may not use this one model: the model README's documented case
NO_ACCESS = openai_wire.error(
    403,
    "invalid_request_error",
    f"Project `proj_abc` does not have access to model `{GPT}`",
    code="model_not_found",
)
TOO_LONG_OPENAI = openai_wire.error(
    400,
    "invalid_request_error",
    "This model's maximum context length is 1047576 tokens. However, your messages resulted "
    "in 1100000 tokens. Please reduce the length of the messages.",
    code="context_length_exceeded",
)
TOO_LONG_ANTHROPIC = anthropic_wire.error(
    400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
)
# vLLM's in its stream, before any token: no type for it but its message (OpenAI's wording)
TOO_LONG_VLLM = openai_wire.error_event(
    "BadRequestError",
    400,
    "This model's maximum context length is 2048 tokens. However, you requested 3012 tokens "
    "(2988 in the messages, 24 in the completion). Please reduce the length of the messages or "
    "completion.",
)
# Anthropic's 413 for a request over its size limit (32 MB)
TOO_LARGE_ANTHROPIC = anthropic_wire.error(
    413, "request_too_large", "Request exceeds the maximum allowed number of bytes."
)
BAD_SCHEMA = anthropic_wire.error(
    400,
    "invalid_request_error",
    "tools.0.custom.input_schema: JSON schema is invalid. It must match JSON Schema draft "
    "2020-12 (https://json-schema.org/draft/2020-12).",
)


@pytest.mark.parametrize(
    ("backend", "model", "reply"),
    [("anthropic", CLAUDE, BAD_SCHEMA)],
    ids=["schema"],
)
async def test_a_refusal_of_the_request_is_invalid_argument_and_the_replica_serves_on(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    backend: Backend,
    model: str,
    reply: Reply,
) -> None:
    replica = replicas(backend, model)
    server.script(backend, reply)
    refused = await replica.call()
    assert refused is not None and refused.code == Code.INVALID_ARGUMENT, refused
    assert reply.body["error"]["message"] in refused.message
    assert replica.calls() == 1  # not retried
    assert await replica.call() is None and replica.health == []  # the next request is served


@pytest.mark.parametrize(
    ("backend", "model", "reply", "context_window"),
    [
        ("openai", GPT, TOO_LONG_OPENAI, True),
        ("openai", GPT, openai_wire.TOO_LONG_LLAMA, True),
        ("openai", GPT, TOO_LONG_VLLM, True),
        ("anthropic", CLAUDE, TOO_LONG_ANTHROPIC, True),
        ("anthropic", CLAUDE, TOO_LARGE_ANTHROPIC, False),
    ],
    ids=["openai-context-length", "llama-server", "vllm-in-stream", "anthropic-too-long", "413"],
)
async def test_a_request_over_a_size_limit_is_resource_exhausted_as_on_the_simulator(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    backend: Backend,
    model: str,
    reply: Reply,
    context_window: bool,
) -> None:
    """A prompt over the model's context window, or a request over the provider's size limit,
    is RESOURCE_EXHAUSTED (the simulator's status for it; DESIGN: size limits), not
    INVALID_ARGUMENT: the request's fault, not retried, no other replica tried. A prompt over
    the context window says so (the HTTP front answers it 400, a request over the size limit
    413)."""
    replica = replicas(backend, model)
    server.script(backend, reply)
    refused = await replica.call()
    assert refused is not None and refused.code == Code.RESOURCE_EXHAUSTED, refused
    body = reply.body if reply.body is not None else json.loads(reply.events[0][1])
    assert body["error"]["message"] in refused.message  # the provider's own words
    assert ("context window" in refused.message) == context_window, refused.message
    assert replica.calls() == 1  # not retried
    assert await replica.call() is None and replica.health == []  # the next request is served


def _said_at_debug_only(caplog: pytest.LogCaptureFixture, refused: RequestError, said: str) -> None:
    """The provider's message ``said`` (which may quote the request) is in no line above DEBUG
    and not in the refusal (the router's span of the call), but in the replica's DEBUG line.
    Before, the refusal and the replica's WARNING line quoted it."""
    assert said not in refused.message + refused.reason, refused.message
    above = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert above and not [line for line in above if said in line], above
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and said in r.getMessage()]


async def test_a_403_other_than_one_models_is_the_replicas_and_goes_to_another(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OpenAI's 403 ``request_forbidden`` (this account's key, from where the replica runs):
    no request of any client can be served by it, and another replica may serve it. It is
    UNAVAILABLE (the router tries the next replica and counts it towards this one's ejection),
    never the client's INVALID_ARGUMENT."""
    replica = replicas("openai", GPT)
    server.script("openai", REGION)
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    assert "403 request_forbidden, code unsupported_country_region_territory" in refused.message
    _said_at_debug_only(caplog, refused, "Country, region, or territory not supported")
    assert refused.reason  # told to the router, which names it if no replica serves
    assert replica.calls() == 1  # no retry: the next replica, at once
    assert await replica.call() is None  # not NOT_SERVING: the router's ejection decides
    assert replica.health == []


# Anthropic's answer to any request while the account has no credit (its real body: a 400
# typed as the request's)
NO_CREDIT = anthropic_wire.error(
    400,
    "invalid_request_error",
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing "
    "to upgrade or purchase credits.",
)


async def test_a_credit_balance_too_low_takes_the_replica_out_until_it_is_rechecked(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No request of any tenant can be served on an account without credit: the replica
    refuses UNAVAILABLE (the router's next replica or tier serves), reports NOT_SERVING, asks
    the provider no more until ``auth_recheck_s`` has passed, then serves again once it can."""
    replica = replicas("anthropic", CLAUDE)
    server.script("anthropic", NO_CREDIT)
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    assert "400 invalid_request_error" in refused.message
    _said_at_debug_only(caplog, refused, "credit balance is too low")
    assert replica.health == [False]
    again = await replica.call()  # refused at once, without asking the provider
    assert again is not None and again.code == Code.UNAVAILABLE
    assert "NOT_SERVING" in again.message and "credit" in again.message
    assert replica.calls() == 1
    replica.now += RECHECK_S  # credit bought meanwhile: the recheck is served
    assert await replica.call() is None
    assert replica.health == [False, True] and replica.calls() == 2


# OpenAI's 429 when the account has no quota left (its real body): no wait makes it pass
NO_QUOTA = openai_wire.error(
    429,
    "insufficient_quota",
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    code="insufficient_quota",
)


async def test_insufficient_quota_is_not_retried_and_takes_the_replica_out(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 429 like a rate limit, but no retry can succeed: the replica refuses at once
    (UNAVAILABLE, the router's next replica or tier serves) and is NOT_SERVING until the
    recheck, instead of retrying it ``max_retries`` times on every request."""
    replica = replicas("openai", GPT)
    server.script("openai", *[NO_QUOTA] * 4)
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    assert "429 insufficient_quota" in refused.message
    _said_at_debug_only(caplog, refused, "exceeded your current quota")
    assert replica.calls() == 1 and replica.health == [False]  # no retry
    again = await replica.call()
    assert again is not None and "NOT_SERVING" in again.message and replica.calls() == 1


async def test_an_in_stream_400_is_the_requests_and_not_retried(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The error's own ``code`` is its status: a 400 is the request's (INVALID_ARGUMENT, no
    other replica tried), not the replica's UNAVAILABLE that the router handed to every
    replica and counted towards their ejection."""
    replica = replicas("openai", GPT)
    message = "'auto' tool choice requires --enable-auto-tool-choice and --tool-call-parser"
    server.script("openai", openai_wire.error_event("BadRequestError", 400, message))
    refused = await replica.call()
    assert refused is not None and refused.code == Code.INVALID_ARGUMENT, refused
    assert "(400)" in refused.message and message in refused.message
    assert replica.calls() == 1
    assert "failed unexpectedly" not in caplog.text
    assert await replica.call() is None and replica.health == []


@pytest.mark.parametrize("code", [500, "500"], ids=["int", "numeric-string"])
async def test_an_in_stream_500_is_retried_like_the_engines_http_500(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
    code: int | str,
) -> None:
    """An engine's 500 inside the stream, before any token, is retried as its HTTP 500 is
    (it failed at once, after one call, with a traceback logged as unexpected)."""
    replica = replicas("openai", GPT)
    failed = openai_wire.error_event("InternalServerError", code, "CUDA error: illegal access")
    server.script("openai", failed, failed)
    assert await replica.call() is None  # answered on the third call
    assert replica.calls() == 3
    assert "failed unexpectedly" not in caplog.text


# OpenAI's 429 for a request that alone is over the account's tokens-per-minute limit (its
# real wording): no wait makes it pass, unlike the "Rate limit reached ..." of a busy minute
TPM_TOO_LARGE = openai_wire.error(
    429,
    "tokens",
    "Request too large for gpt-4.1 in organization org-abc on tokens per min (TPM): Limit "
    "30000, Requested 45000. The input or output tokens must be reduced in order to run "
    "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
    code="rate_limit_exceeded",
)
# the same limit reached by the minute's other requests: waiting makes it pass
TPM_REACHED = openai_wire.error(
    429,
    "tokens",
    "Rate limit reached for gpt-4.1 in organization org-abc on tokens per min (TPM): Limit "
    "30000, Used 29000, Requested 2000. Please try again in 2s. Visit "
    "https://platform.openai.com/account/rate-limits to learn more.",
    code="rate_limit_exceeded",
)


async def test_a_request_over_the_accounts_token_rate_alone_is_resource_exhausted(
    server: WireServer, replicas: Callable[[Backend, str], Replica]
) -> None:
    """A 429 whose request alone asks more tokens than the account's per-minute limit can never
    pass by waiting: RESOURCE_EXHAUSTED at once (the request's; no retry, no other replica, no
    ejection), the provider's words kept. Before, it was retried as a rate limit on every
    replica (4 calls each), each ejected, and the client got a 503 "retry later"."""
    replica = replicas("openai", GPT)
    server.script("openai", TPM_TOO_LARGE)
    refused = await replica.call()
    assert refused is not None and refused.code == Code.RESOURCE_EXHAUSTED, refused
    assert TPM_TOO_LARGE.body["error"]["message"] in refused.message
    assert "per-minute" in refused.message and "context window" not in refused.message
    assert replica.calls() == 1  # not retried
    assert await replica.call() is None and replica.health == []


async def test_a_token_rate_reached_by_other_requests_is_still_retried(
    server: WireServer, replicas: Callable[[Backend, str], Replica]
) -> None:
    replica = replicas("openai", GPT)
    server.script("openai", TPM_REACHED)
    assert await replica.call() is None
    assert replica.calls() == 2  # the 429, then its retry answered
    # after the wait its message asks ("Please try again in 2s"; no retry-after header)
    assert replica.waits == [2.0]


# OpenAI's rate limit reached, its wait longer than the call's deadline (10 s), said in its
# message alone (as OpenAI's say it: no retry-after header)
TPM_REACHED_LONG = openai_wire.error(
    429,
    "tokens",
    "Rate limit reached for gpt-4.1 in organization org-abc on tokens per min (TPM): Limit "
    "30000, Used 29900, Requested 2000. Please try again in 41.724s. Visit "
    "https://platform.openai.com/account/rate-limits to learn more.",
    code="rate_limit_exceeded",
)


async def test_a_rate_limit_whose_worded_wait_outlasts_the_deadline_is_handed_over_at_once(
    server: WireServer, replicas: Callable[[Backend, str], Replica]
) -> None:
    """OpenAI words a rate limit's wait in its message ("Please try again in 41.724s"), with
    no retry-after header: the replica waits that long, or hands the call over at once when
    the wait outlasts the deadline, and tells its callers that wait. Before, it retried after
    its backoff alone (3 retries within a second, each refused again: 4 calls counted against
    the account's limit) and told them the backoff's wait, 1 s."""
    replica = replicas("openai", GPT)
    server.script("openai", *[TPM_REACHED_LONG] * 4)
    refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    assert replica.calls() == 1 and replica.waits == []
    assert refused.retry_after_s == 42
    assert "outlasts the request's deadline" in refused.message
    server.reset()  # the scripted refusals not taken


@pytest.mark.parametrize(
    "headers", [{"retry-after": "3"}, {"retry-after-ms": "3000"}], ids=["seconds", "ms"]
)
async def test_a_retry_after_header_wins_over_the_wait_its_message_words(
    server: WireServer, replicas: Callable[[Backend, str], Replica], headers: dict[str, str]
) -> None:
    """A rate limit that says its wait both ways (a ``retry-after`` or ``retry-after-ms``
    header of 3 s, and "Please try again in 41.724s" in its message) is waited for as the
    header says: the header is the provider's own machine-read wait, the words a fallback for
    a 429 without one. Nothing pinned that order: a change reading the words first would have
    waited 42 s (or handed the call over at once, past the deadline) for a 3 s limit."""
    replica = replicas("openai", GPT)
    both = openai_wire.error(
        429,
        "tokens",
        "Rate limit reached for gpt-4.1 in organization org-abc on tokens per min (TPM): Limit "
        "30000, Used 29900, Requested 2000. Please try again in 41.724s.",
        code="rate_limit_exceeded",
        headers=headers,
    )
    server.script("openai", both)
    assert await replica.call() is None
    assert replica.calls() == 2  # the 429, then its retry answered
    assert replica.waits == [3.0]


# a base URL without its /v1: vLLM's (FastAPI's) own 404, no error object, no model in it
NO_ROUTE = Reply(status=404, body={"detail": "Not Found"})
# the providers' 404 for a model they do not serve: the replica's set-up (its upstream model)
NO_MODEL_OPENAI = openai_wire.error(
    404,
    "invalid_request_error",
    "The model `gpt-4.1-x` does not exist or you do not have access to it.",
    code="model_not_found",
)
NO_MODEL_ANTHROPIC = anthropic_wire.error(404, "not_found_error", "model: claude-sonnet-4-x")
NO_MODEL_VLLM = Reply(
    status=404,
    body={
        "object": "error",
        "message": "The model `Qwen2.5-1.5B` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    },
)
# Anthropic's 404 for a path it does not have (ANTHROPIC_BASE_URL with a path of its own)
NO_ROUTE_ANTHROPIC = anthropic_wire.error(404, "not_found_error", "Not Found")


@pytest.mark.parametrize(
    ("backend", "model", "reply", "quoted"),
    [
        ("openai", GPT, NO_ROUTE, '"detail": "Not Found"'),
        ("anthropic", CLAUDE, NO_ROUTE_ANTHROPIC, "Not Found"),
    ],
    ids=["vllm-detail", "anthropic-path"],
)
async def test_a_404_not_about_a_model_is_the_replicas_and_goes_to_another(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    backend: Backend,
    model: str,
    reply: Reply,
    quoted: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 404 that names no model (the replica's base URL wrong, a path the engine does not
    have) fails every request of every client on this replica and none on a replica set up
    right: UNAVAILABLE (the router's next replica, counted towards this one's ejection), its
    body quoted for the operator. Before, every caller got a 400 "refused the request (404)"
    without the engine's words, and no alert watched it."""
    replica = replicas(backend, model)
    server.script(backend, reply)
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    assert "404" in refused.message
    _said_at_debug_only(caplog, refused, quoted)
    assert f"is {backend.upper()}_BASE_URL ({replica.server.base}" in refused.message
    assert refused.reason and "404" in refused.reason and "BASE_URL" not in refused.reason
    assert replica.calls() == 1  # no retry: the next replica, at once


@pytest.mark.parametrize(
    ("backend", "model", "reply"),
    [
        ("openai", GPT, NO_MODEL_OPENAI),
        ("anthropic", CLAUDE, NO_MODEL_ANTHROPIC),
        ("openai", GPT, NO_MODEL_VLLM),
        ("openai", GPT, NO_ACCESS),
    ],
    ids=["openai", "anthropic", "vllm", "openai-403-model-not-found"],
)
async def test_a_404_or_403_about_the_model_is_the_replicas(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    backend: Backend,
    model: str,
    reply: Reply,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller names a row of the model table, never the provider's model: a replica whose
    provider does not serve the model it asks for (``MODEL_UPSTREAM_IDS``, an engine that has
    not loaded it, a retired model, a key that may not use it) fails every request for it and
    none on a replica set up right: UNAVAILABLE (the router's next replica, counted toward this
    one's ejection for that model, the Gateway's error alert), the replica's line saying what
    to check. Before, each caller got a 400 as if it had named a wrong model, and no alert."""
    replica = replicas(backend, model)
    server.script(backend, reply)
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    inner = reply.body.get("error", reply.body)
    _said_at_debug_only(caplog, refused, inner["message"])
    assert "MODEL_UPSTREAM_IDS" in refused.message and "MODEL_UPSTREAM_IDS" not in refused.reason
    assert replica.calls() == 1  # no retry: the next replica, at once


# Anthropic's 429 for an account's input tokens a minute (its real wording, the same whether
# the minute's other requests filled the limit or the request alone is over it), and the rate
# limit headers its responses carry (``anthropic-ratelimit-input-tokens-limit``: the input
# tokens a minute the account may send)
ORGANIZATION = "4a7a4c1e-0000-4000-8000-000000000000"  # the operator's: no tenant's to read
ITPM_MESSAGE = (
    "This request would exceed the rate limit for your organization "
    f"({ORGANIZATION}) of 1,000 input tokens per minute. For details, "
    "refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers "
    "for current usage. Please reduce the prompt length or the maximum tokens requested, or "
    "try again later. You may also contact sales at https://www.anthropic.com/contact-sales "
    "to discuss your options for a rate limit increase."
)
ITPM_HEADERS = {
    "anthropic-ratelimit-input-tokens-limit": "1000",
    "anthropic-ratelimit-input-tokens-remaining": "0",
    "anthropic-ratelimit-input-tokens-reset": "2026-12-06T10:41:00Z",
    "anthropic-ratelimit-output-tokens-limit": "200",
    "anthropic-ratelimit-tokens-limit": "200",  # the most restrictive: here the output's
}
# some 1,800 tokens of cl100k_base (" word" is one token): the request alone is over 1,000
LONG = " word" * 1800


def _itpm(headers: dict[str, str] | None = None) -> Reply:
    return anthropic_wire.error(429, "rate_limit_error", ITPM_MESSAGE, headers=headers)


@pytest.mark.parametrize(
    ("reply", "planned"),
    [
        (_itpm(ITPM_HEADERS), None),  # the headers' limit, the replica's own count
        (_itpm(ITPM_HEADERS), 1800),  # Plan's count
        (_itpm(), None),  # no headers: the message's figure
    ],
    ids=["headers", "plan's-count", "message"],
)
async def test_an_anthropic_request_alone_over_the_input_token_rate_is_not_retried(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    reply: Reply,
    planned: int | None,
) -> None:
    """Anthropic answers "This request would exceed the rate limit ... of 1,000 input tokens
    per minute" whether the minute's other requests or the request alone is over it. A prompt
    of ~1,800 tokens against 1,000 a minute can never pass: RESOURCE_EXHAUSTED at once (no
    retry, no other replica, no ejection), the provider's words and both figures kept. Before,
    it was retried as a rate limit (4 calls), then UNAVAILABLE: the next replica, ejections,
    a 503 "retry later"."""
    replica = replicas("anthropic", CLAUDE)
    server.script("anthropic", *[reply] * 4)  # as often as the replica would try
    refused = await replica.call(LONG, planned_tokens=planned)
    assert refused is not None, "answered"
    assert (refused.code, replica.calls()) == (Code.RESOURCE_EXHAUSTED, 1), refused.message
    # the provider's words, the operator's organization (its UUID) taken out
    assert ITPM_MESSAGE.replace(ORGANIZATION, "[redacted]") in refused.message
    assert ORGANIZATION not in refused.message + refused.reason
    assert "per-minute" in refused.message and "context window" not in refused.message
    assert "of 1,000 input tokens: its prompt is about 1,80" in refused.message, refused.message
    assert replica.health == []


@pytest.mark.parametrize(
    ("text", "cached_system", "planned"),
    [
        ("Capital?", "", None),  # a small request: the minute's other requests filled it
        (" word" * 1050, "", None),  # over by less than the estimate's margin
        ("Capital?", LONG, None),  # its bulk before a breakpoint: may be a cache read
        ("Capital?", LONG, 1810),  # the same with Plan's count
    ],
    ids=["small", "within-the-margin", "cached-prefix", "cached-prefix-plan"],
)
async def test_an_anthropic_rate_limit_a_wait_may_pass_is_still_retried(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    text: str,
    cached_system: str,
    planned: int | None,
) -> None:
    """Only a request whose own input is surely over the limit is refused: a prompt that fits,
    one over it by less than the estimate's margin (cl100k_base is not Claude's tokenizer),
    and one whose bulk lies before a cache breakpoint (a cache read, which Anthropic does not
    count towards the limit) are retried as before."""
    replica = replicas("anthropic", CLAUDE)
    server.script("anthropic", _itpm(ITPM_HEADERS))
    assert await replica.call(text, planned_tokens=planned, cached_system=cached_system) is None
    assert replica.calls() == 2  # the 429, then its retry answered


# Anthropic's 400s carry no param: the field path their message begins with is it
MAX_TOKENS_ANTHROPIC = anthropic_wire.error(
    400,
    "invalid_request_error",
    f"max_tokens: 64000 > 32000, which is the maximum allowed number of output tokens for {CLAUDE}",
)
UNMATCHED_RESULT_ANTHROPIC = anthropic_wire.error(
    400,
    "invalid_request_error",
    "messages.1.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_01. "
    "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.",
)


async def test_anthropics_400s_are_told_apart_on_the_line_by_the_field_they_name(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model-table mistake (max_tokens over the model's) and a translation bug of ours (a
    tool_result its tool_use is not before) logged alike, "400 invalid_request_error": the
    field path Anthropic's message begins with is its param, on the line and the reason; the
    rest of the message (which may quote the request) stays at DEBUG. The line says the status
    once (it was "(400): 400 invalid_request_error")."""
    lines: list[str] = []
    for reply, param in (
        (MAX_TOKENS_ANTHROPIC, "max_tokens"),
        (UNMATCHED_RESULT_ANTHROPIC, "messages.1.content.0"),
    ):
        replica = replicas("anthropic", CLAUDE)
        server.script("anthropic", reply)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
            refused = await replica.call()
        assert refused is not None and refused.code == Code.INVALID_ARGUMENT, refused
        assert f"400 invalid_request_error, param {param}" in refused.reason
        line = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(line) == 1, line
        assert line[0].endswith(
            f"anthropic refused the request: 400 invalid_request_error, param {param}"
        ), line
        rest = reply.body["error"]["message"][len(param) + 2 :]  # the caller's error has it
        assert not [
            r for r in caplog.records if r.levelno > logging.DEBUG and rest in r.getMessage()
        ]
        assert [r for r in caplog.records if r.levelno == logging.DEBUG and rest in r.getMessage()]
        lines.append(line[0])
    assert lines[0] != lines[1]


async def test_an_engines_message_is_not_read_for_a_param(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only Anthropic's messages begin with a field path: an OpenAI-compatible engine's
    "error: ..." names no field."""
    replica = replicas("openai", GPT)
    server.script("openai", openai_wire.error(400, "BadRequestError", "error: bad request body"))
    refused = await replica.call()
    assert refused is not None and refused.code == Code.INVALID_ARGUMENT, refused
    assert "param" not in refused.reason


# OpenAI's 401 to a restricted key without a scope: not a wrong key (its real body)
MISSING_SCOPES = openai_wire.error(
    401,
    "invalid_request_error",
    "You have insufficient permissions for this operation. Missing scopes: model.request. "
    "Check that you have the correct role in your organization (Reader, Writer, Owner) and "
    "project (Member, Owner), and if you're using a restricted API key, that it has the "
    "necessary scopes.",
)
WRONG_KEY = openai_wire.error(
    401,
    "invalid_request_error",
    "Incorrect API key provided: sk-opena************************cdef. You can find your API "
    "key at https://platform.openai.com/account/api-keys.",
    code="invalid_api_key",
)


@pytest.mark.parametrize(
    ("reply", "said"),
    [(MISSING_SCOPES, "Missing scopes: model.request"), (WRONG_KEY, "Incorrect API key provided")],
    ids=["missing-scopes", "wrong-key"],
)
async def test_a_401s_words_are_on_the_operators_error_line_without_the_key(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
    reply: Reply,
    said: str,
) -> None:
    """A 401's body from the provider's own API is about our key, never the request: its
    (redacted) message is on the ERROR line, which said "401 invalid_request_error" alike for
    a key without a scope and a wrong key; never a part of the key, and not in the refusal the
    router and client see. (The loopback stands for api.openai.com here: the settings are
    told they are at the provider's own URL.)"""
    replica = replicas("openai", GPT)
    server.script("openai", reply)
    with (
        mock.patch.object(ProviderSettings, "at_the_providers_own_url", property(lambda _: True)),
        caplog.at_level(logging.INFO, logger="cachemesh.model"),
    ):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and said in errors[0], errors
    assert "NOT_SERVING" in errors[0]
    for line in [r.getMessage() for r in caplog.records]:
        assert "sk-opena" not in line and "cdef" not in line and "loopback-0123" not in line
    assert said not in refused.message + refused.reason


# OpenRouter's guardrail 403, in Anthropic's permission_error envelope: its judgement of the
# input, which quotes it
GUARDRAIL = anthropic_wire.error(
    403,
    "permission_error",
    "Your request was flagged by the moderation guardrail: 'how do I pick the lock of my "
    "neighbour Ada Lovelace's flat at 12 Baker St' violates the policy",
)


@pytest.mark.parametrize(
    ("backend", "model", "reply", "words"),
    [
        ("anthropic", CLAUDE, GUARDRAIL, "Ada Lovelace"),
        ("openai", GPT, MISSING_SCOPES, "Missing scopes"),
    ],
    ids=["guardrail-403", "missing-scopes-401"],
)
async def test_a_403s_words_from_behind_a_base_url_are_not_on_any_line_above_debug(
    server: WireServer,
    replicas: Callable[[Backend, str], Replica],
    caplog: pytest.LogCaptureFixture,
    backend: Backend,
    model: str,
    reply: Reply,
    words: str,
) -> None:
    """A gateway, a proxy or an engine behind ``*_BASE_URL`` (the loopback here) may put any
    text in a 401/403 body (OpenRouter's guardrail quotes the input): the ERROR line that
    takes the replica out names the status and type only; the words stay at DEBUG."""
    replica = replicas(backend, model)
    server.script(backend, reply)
    with caplog.at_level(logging.DEBUG, logger="cachemesh.model"):
        refused = await replica.call()
    assert refused is not None and refused.code == Code.UNAVAILABLE, refused
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "NOT_SERVING" in errors[0], errors
    assert f"({reply.status} " in errors[0], errors
    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert not [line for line in above_debug if words in line], above_debug
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and words in r.getMessage()]
