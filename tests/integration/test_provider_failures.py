"""Point 5 of issue 10 on real processes: retries that honour retry-after within the deadline,
the hand-over to the next replica, a 400's message, revoked credentials (NOT_SERVING, the
other replica serves, one log line), a stream broken midway (billed, never stored), and a
provider that hangs (cut at the deadline)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anthropic
import grpc
import openai
import pytest

from cachemesh import CachemeshError, Client, RateLimitError, RequestTooLargeError
from cachemesh._channel import MAX_ATTEMPTS
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1.prefix_cache_pb2 import TotalsResponse
from services.tools.stack.health import probe
from services.tools.stack.otlp_sink import Span
from tests.integration.provider_stack import (
    MODEL_TIMEOUT_S,
    ProviderStack,
    ask,
    router_spans,
    spans_of_request,
)
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply


def _client(
    providers: ProviderStack,
    tenant: str = "tenant-a",
    *,
    max_attempts: int = MAX_ATTEMPTS,
    timeout_s: float = 120.0,
) -> Client:
    return Client(
        providers.stack.target,
        api_key=providers.stack.keys[tenant],
        max_attempts=max_attempts,
        timeout_s=timeout_s,
    )


def _refused(
    providers: ProviderStack, client: Client, request: pb.CompleteRequest
) -> CachemeshError:
    with pytest.raises(CachemeshError) as caught:
        client.complete(request)
    providers.errors.append(str(caught.value))
    return caught.value


pytestmark = pytest.mark.integration


def test_a_429_is_retried_after_its_retry_after_on_the_same_replica(
    providers: ProviderStack,
) -> None:
    server = providers.server
    server.script(
        "anthropic",
        anthropic_wire.error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit.",
            {"retry-after": "1"},
        ),
    )
    question = f"Rate limited question {uuid.uuid4().hex[:8]}"
    with _client(providers) as client:
        answer = client.complete(ask("claude-sonnet-4-5", question))
    calls = [s for s in server.seen_by("anthropic") if question in str(s.body)]
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].key == calls[1].key  # the same replica retried
    assert answer.content[0].text == "Paris is the capital of France."
    # it waited what retry-after asked (1 s), not a backoff of its own: the replica's retry
    # names its wait (it sleeps that wait next: tests/unit/test_provider_deadline.py, on an
    # injected clock), by its cause, not by real time
    (replica_call,) = _model_spans(providers, answer.trace_id, 1)
    assert replica_call.attributes.get("cachemesh.provider.retries") == 1
    retries = [a for e, a in replica_call.events if e == "cachemesh.provider.retry"]
    assert [(a["http.status"], a["wait_s"]) for a in retries] == [(429, 1.0)]


def test_529_overloaded_and_500_are_retried_with_backoff(providers: ProviderStack) -> None:
    server = providers.server
    server.script(
        "anthropic",
        Reply(status=529, body=anthropic_wire.overloaded_body()),
        anthropic_wire.error(500, "api_error", "Internal server error"),
    )
    question = f"Overloaded question {uuid.uuid4().hex[:8]}"
    with _client(providers) as client:
        answer = client.complete(ask("claude-sonnet-4-5", question))
    calls = [s for s in server.seen_by("anthropic") if question in str(s.body)]
    assert [c.status for c in calls] == [529, 500, 200]
    assert answer.stop_reason == "end_turn"
    _, chats = router_spans(providers.stack, answer.trace_id)
    assert len(chats) == 1  # retried inside the replica: one model call for the router


def test_a_retry_after_beyond_the_deadline_goes_to_the_next_replica(
    providers: ProviderStack,
) -> None:
    server = providers.server
    server.script(
        "openai",
        openai_wire.error(
            429,
            "requests",
            "Rate limit reached for gpt-4.1 in organization org-x on requests per min (RPM).",
            code="rate_limit_exceeded",
            headers={"retry-after": "600"},
        ),
    )
    question = f"Far retry-after {uuid.uuid4().hex[:8]}"
    with _client(providers) as client:
        answer = client.complete(ask("gpt-4-1", question))
    calls = [s for s in server.seen_by("openai") if question in str(s.body)]
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].key != calls[1].key  # handed to the other gpt-4-1 replica
    # "at once", by its cause and order (no wall-clock bound): the first replica refused the
    # call at its 429 (UNAVAILABLE, its retry-after outlasting the deadline), not at the
    # router's deadline (DEADLINE_EXCEEDED), and only then did the other replica get it
    by_key = {key: providers.replicas[name] for name, key in providers.keys.items()}
    root, chats = router_spans(providers.stack, answer.trace_id, calls=2)
    tried = {c.attributes["cachemesh.replica"]: c.attributes for c in chats}
    assert list(tried) == [by_key[calls[0].key], by_key[calls[1].key]]  # in the order sent
    first, second = tried.values()
    assert (first.get("error.type"), first["cachemesh.route_reason"]) == (
        "UNAVAILABLE",
        "round_robin",
    )
    assert (second.get("error.type"), second["cachemesh.route_reason"]) == (None, "fallback")
    assert root.attributes["cachemesh.route_reason"] == "fallback"
    # and the first replica made no retry of its own: no wait for the retry-after at all
    replica_calls = _model_spans(providers, answer.trace_id, 2)
    assert [s.attributes.get("cachemesh.provider.retries") for s in replica_calls] == [None, None]
    assert not [e for s in replica_calls for e, _ in s.events if e == "cachemesh.provider.retry"]


def _router_chats(providers: ProviderStack, request_id: str) -> list[Span]:
    """The router's model-call spans of the request with this id (a failed call gives the
    client no trace id), once its root span and at least one of them are exported."""
    trace_id = spans_of_request(providers.stack, request_id, "router")[0].trace_id
    return router_spans(providers.stack, trace_id)[1]


def _model_spans(providers: ProviderStack, trace_id: str, count: int) -> list[Span]:
    """The model replicas' spans of their provider calls in the trace, once ``count`` are
    exported (an absence checked on them then covers every call)."""
    deadline = time.monotonic() + 20
    while True:
        found = [
            s
            for s in providers.stack.sink.spans_of(trace_id)
            if s.service != "router" and "gen_ai.provider.name" in s.attributes
        ]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"model spans not exported: {found}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("api", "model", "refusal", "status"),
    [
        (
            "anthropic",
            "claude-sonnet-4-5",  # one replica: anthropic-1
            anthropic_wire.error(
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
                {"retry-after": "30"},
            ),
            529,
        ),
        (
            "openai",
            "gpt-4o-mini",  # one replica: openai-1
            openai_wire.error(
                429,
                "requests",
                "Rate limit reached for gpt-4o-mini in organization org-x on requests per min.",
                code="rate_limit_exceeded",
                headers={"retry-after": "30"},
            ),
            503,
        ),
    ],
    ids=["anthropic", "openai"],
)
def test_a_providers_retry_after_past_the_deadline_reaches_the_http_caller(
    providers: ProviderStack, api: str, model: str, refusal: Reply, status: int
) -> None:
    """Every replica's provider asked for 30 s of quiet: the front's 529 / 503 says so
    (``retry-after: 30``), which both SDKs honour. Before, it said no wait, and an SDK with its
    default retries called the provider three times in 1.7 s."""
    server = providers.server
    server.script(api, refusal)
    tag = f"Rate limited {uuid.uuid4().hex[:8]}"
    front = f"http://{providers.stack.addresses['http-front']}"
    key = providers.stack.keys["tenant-a"]
    asked: Any = [{"role": "user", "content": tag}]
    error: anthropic.APIStatusError | openai.APIStatusError
    try:
        if api == "openai":
            with pytest.raises(openai.APIStatusError) as refused_openai:
                openai.OpenAI(
                    base_url=front + "/v1", api_key=key, max_retries=0
                ).chat.completions.create(model=model, max_tokens=64, messages=asked)
            error = refused_openai.value
        else:
            with pytest.raises(anthropic.APIStatusError) as refused_anthropic:
                anthropic.Anthropic(base_url=front, api_key=key, max_retries=0).messages.create(
                    model=model, max_tokens=64, messages=asked
                )
            error = refused_anthropic.value
    finally:
        with server._lock:  # a refusal not used must not reach the next tests
            server.scripts[api] = [r for r in server.scripts[api] if r is not refusal]
    assert error.status_code == status
    assert error.response.headers.get("retry-after") == "30"
    assert error.response.headers.get("x-should-retry") is None  # the SDK may wait and retry
    assert "in 30 s, as the provider asked" in str(error.body)
    assert [s.status for s in server.seen_by(api) if tag in str(s.body)] == [429]


def test_a_400_is_invalid_argument_with_the_providers_message(providers: ProviderStack) -> None:
    providers.server.script(
        "openai",
        openai_wire.error(
            400,
            "invalid_request_error",
            "Invalid parameter: messages with role 'tool' must be a response to a "
            "preceeding message with 'tool_calls'.",
        ),
    )
    with _client(providers) as client:
        error = _refused(providers, client, ask("gpt-4o-mini", f"Bad turn {uuid.uuid4().hex[:8]}"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a response to a preceeding message with 'tool_calls'" in str(error)


def test_an_engines_400_inside_the_stream_is_the_clients_and_no_other_replica_gets_it(
    providers: ProviderStack,
) -> None:
    """vLLM refuses a request with an error event inside a 200 stream, its status in ``code``.
    It was UNAVAILABLE: the router handed the bad request to the other gpt-4-1 replica (which
    answered it here) and counted the refusal towards the first one's ejection."""
    server = providers.server
    message = "'auto' tool choice requires --enable-auto-tool-choice and --tool-call-parser"
    server.script("openai", openai_wire.error_event("BadRequestError", 400, message))
    tag = f"Engine refusal {uuid.uuid4().hex[:8]}"
    with _client(providers, max_attempts=1) as client:
        error = _refused(providers, client, ask("gpt-4-1", tag))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(error)
    calls = [s for s in server.seen_by("openai") if tag in str(s.body)]
    assert len(calls) == 1  # no other replica asked


@pytest.mark.parametrize(
    ("api", "model", "reply", "sdk_error", "http_status"),
    [
        (
            "openai",
            "gpt-4-1",
            openai_wire.error(
                400,
                "invalid_request_error",
                "This model's maximum context length is 1047576 tokens. However, your messages "
                "resulted in 1100000 tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
            ),
            openai.BadRequestError,
            400,
        ),
        (
            "anthropic",
            "claude-sonnet-4-5",
            anthropic_wire.error(
                413, "request_too_large", "Request exceeds the maximum allowed number of bytes."
            ),
            anthropic.RequestTooLargeError,
            413,
        ),
        (
            "openai",
            "gpt-4-1",
            openai_wire.error(
                429,
                "tokens",
                "Request too large for gpt-4.1 in organization org-x on tokens per min (TPM): "
                "Limit 30000, Requested 45000. The input or output tokens must be reduced in "
                "order to run successfully.",
                code="rate_limit_exceeded",
            ),
            openai.APIStatusError,
            413,
        ),
        (
            "anthropic",
            "claude-sonnet-4-5",
            anthropic_wire.error(  # Anthropic's words, with no count of the request
                429,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization (org-x) of 5 "
                "input tokens per minute. For details, refer to: "
                "https://docs.claude.com/en/api/rate-limits. You can see the response headers "
                "for current usage. Please reduce the prompt length or the maximum tokens "
                "requested, or try again later.",
                headers={"anthropic-ratelimit-input-tokens-limit": "5"},
            ),
            anthropic.RequestTooLargeError,
            413,
        ),
    ],
    ids=[
        "context-window",
        "413",
        "429-alone-over-the-token-rate",
        "anthropic-429-alone-over-the-input-token-rate",
    ],
)
def test_a_request_over_a_providers_size_limit_is_resource_exhausted_and_the_sdks_own_error(
    providers: ProviderStack,
    api: str,
    model: str,
    reply: Reply,
    sdk_error: type[Exception],
    http_status: int,
) -> None:
    """A prompt over the context window or a request over the provider's size limit is
    RESOURCE_EXHAUSTED on the Gateway, as the simulator's (it was INVALID_ARGUMENT, and the
    HTTP front answered a provider's 413 as a 400); through the HTTP front, the SDK's own
    exception for it (400 or 413, never a 429 it would retry). Neither is tried on another
    replica nor retried by the SDK: one provider call each. So is a request alone over the
    account's tokens per minute (OpenAI's 429 "Request too large for ...", Anthropic's 429 "This
    request would exceed the rate limit ... of 5 input tokens per minute" for a longer prompt),
    which was retried as a rate limit on each replica, each one ejected, and answered 503 "retry
    later"."""
    server = providers.server
    server.script(api, reply, reply)
    tag = f"Too large {uuid.uuid4().hex[:8]}"
    front = f"http://{providers.stack.addresses['http-front']}"
    key = providers.stack.keys["tenant-a"]
    ask_http: Any = [{"role": "user", "content": f"{tag} (HTTP)"}]
    try:
        with _client(providers, max_attempts=1) as client:
            error = _refused(providers, client, ask(model, f"{tag} (gRPC)"))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert reply.body["error"]["message"] in str(error)
        # no wait lifts it: not a RateLimitError (a caller's sleep-and-retry looped forever)
        assert isinstance(error, RequestTooLargeError) and not isinstance(error, RateLimitError)
        too_large = "CONTEXT_WINDOW" if "context_length" in str(reply.body) else "REQUEST_TOO_LARGE"
        assert error.reason == too_large
        with pytest.raises(sdk_error) as raised:  # the SDK's default retries (2) left on
            if api == "openai":
                openai.OpenAI(base_url=front + "/v1", api_key=key).chat.completions.create(
                    model=model, max_tokens=64, messages=ask_http
                )
            else:
                anthropic.Anthropic(base_url=front, api_key=key).messages.create(
                    model=model, max_tokens=64, messages=ask_http
                )
        if too_large == "CONTEXT_WINDOW":  # OpenAI's code and param for it, as it answers
            assert isinstance(raised.value, openai.BadRequestError)
            assert (raised.value.code, raised.value.param) == (
                "context_length_exceeded",
                "messages",
            )
    finally:
        with server._lock:  # a refusal not used must not reach the next tests
            server.scripts[api] = [r for r in server.scripts[api] if r is not reply]
    assert getattr(raised.value, "status_code", None) == http_status
    calls = [s for s in server.seen_by(api) if tag in str(s.body)]
    assert len(calls) == 2  # one each: no other replica, no retry


@pytest.mark.parametrize(
    "refusal",
    [
        openai_wire.error(
            403,
            "request_forbidden",
            "Country, region, or territory not supported",
            code="unsupported_country_region_territory",
        ),
        # openai-1's base URL without its /v1, in front of vLLM: FastAPI's own 404
        Reply(status=404, body={"detail": "Not Found"}),
    ],
    ids=["403-region", "404-no-route"],
)
def test_a_refusal_of_one_replicas_set_up_goes_to_the_other_replica(
    providers: ProviderStack, refusal: Reply
) -> None:
    """gpt-4-1 has two replicas. OpenAI refuses openai-1's key from where it runs (403
    ``request_forbidden``), or openai-1's engine has no such path (a 404 about no model): no
    request is the client's fault, each one openai-1 gets is served by openai-2 (it was
    INVALID_ARGUMENT for every other request: a 400 "openai refused the request (404)")."""
    server, key = providers.server, providers.keys["openai-1"]
    tag = f"Replica's refusal {uuid.uuid4().hex[:8]}"
    # not ejected by an earlier test's refusals (or the other param's)
    _answered_by(providers, "openai-1", f"Served first {uuid.uuid4().hex[:8]}")
    refusal.key = key
    server.script("openai", *[refusal] * 4)
    try:
        with _client(providers, max_attempts=1) as client:
            answers = [client.complete(ask("gpt-4-1", f"{tag} #{n}")) for n in range(4)]
    finally:
        with server._lock:  # the refusals not used must not reach the next tests
            server.scripts["openai"] = [r for r in server.scripts["openai"] if r.key != key]
    assert all(a.content[0].text == "Paris is the capital of France." for a in answers)
    calls = [s for s in server.seen_by("openai") if tag in str(s.body)]
    refused = [c for c in calls if c.status == refusal.status]
    assert refused and all(c.key == key for c in refused)  # openai-1 was asked, and refused
    assert len(calls) == 4 + len(refused)  # each refused request was served by openai-2


def test_revoked_credentials_turn_the_replica_not_serving_and_the_other_serves(
    providers: ProviderStack,
) -> None:
    bad = providers.replicas["anthropic-bad"]
    with _client(providers) as client:
        answers = [
            client.complete(ask("claude-haiku-4-5", f"Haiku question {n} {uuid.uuid4().hex[:6]}"))
            for n in range(3)
        ]
    assert all(a.content[0].text == "Paris is the capital of France." for a in answers)
    # every call the revoked key made this session (the server's record is never cleared: an
    # earlier test asking claude-haiku-4-5 may have met the 401 first): the first, and no other
    rejected = [
        s for s in providers.server.seen_by("anthropic") if s.key == providers.keys["anthropic-bad"]
    ]
    assert len(rejected) == 1  # after its 401 the replica refuses at once, without calling
    assert probe(bad) == "NOT_SERVING"
    log = (providers.log_dir / "anthropic-bad.log").read_text()
    lines = [line for line in log.splitlines() if "refused the credentials" in line]
    assert len(lines) == 1 and "NOT_SERVING" in lines[0] and "ANTHROPIC_API_KEY" in lines[0]


def test_a_stream_broken_midway_is_billed_and_never_stored(providers: ProviderStack) -> None:
    server = providers.server
    question = f"Broken stream question {uuid.uuid4().hex[:8]}"
    server.script(
        "anthropic",
        Reply(
            events=anthropic_wire.stream(
                "claude-sonnet-4-5",
                ["Paris", " is the", " capital", " of France."],
                anthropic_wire.Usage(input_tokens=25, output_tokens=9),
                error_after=2,
            )
        ),
    )
    request = ask("claude-sonnet-4-5", question)
    request.cache.semantic = pb.SEMANTIC_MODE_USE
    before = providers.stack.totals("tenant-b")
    with _client(providers, "tenant-b") as client:
        with pytest.raises(CachemeshError) as caught:
            list(client.stream(request))
        providers.errors.append(str(caught.value))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "broke off" in str(caught.value) and "overloaded_error" in str(caught.value)
        deadline = time.monotonic() + 10
        while (after := providers.stack.totals("tenant-b")).requests == before.requests:
            assert time.monotonic() < deadline, "the broken answer was never billed"
            time.sleep(0.1)
        # billed: the prompt as the provider reported it at message_start, and the
        # tokens produced before the break ("Paris is the" = 3 cl100k tokens)
        assert after.usage.input_tokens - before.usage.input_tokens == 25
        assert after.usage.output_tokens - before.usage.output_tokens == 3
        assert after.cost_nanos - before.cost_nanos == 25 * 3000 + 3 * 15000
        # never stored: the same question reaches the provider again
        again = client.complete(request)
    assert again.served_by != pb.LAYER_SEMANTIC_CACHE
    assert len([s for s in server.seen_by("anthropic") if question in str(s.body)]) == 2


def _billed(providers: ProviderStack, tenant: str, before: int, count: int) -> TotalsResponse:
    """The tenant's totals once ``count`` more requests are billed (bills land in the
    background)."""
    deadline = time.monotonic() + 10
    while (after := providers.stack.totals(tenant)).requests < before + count:
        assert time.monotonic() < deadline, "the cut answer was never billed"
        time.sleep(0.1)
    return after


def _script_cut(providers: ProviderStack, model: str) -> None:
    """The next OpenAI call streams "Paris", " is the" and is cut there (no [DONE])."""
    stream = openai_wire.stream(model, ["Paris", " is the", " capital."], None, cut_after=2)
    providers.server.script("openai", Reply(events=stream, cut=True))


def test_an_openai_stream_cut_without_done_is_billed_and_not_stored(
    providers: ProviderStack,
) -> None:
    """gpt-4o-mini has one replica: nothing can take the cut request over, so a client that
    asked for no retry sees UNAVAILABLE; the cut call is billed and never stored."""
    question = f"Cut stream question {uuid.uuid4().hex[:8]}"
    _script_cut(providers, "gpt-4o-mini")
    request = ask("gpt-4o-mini", question)
    request.cache.semantic = pb.SEMANTIC_MODE_USE
    before = providers.stack.totals("tenant-b")
    with _client(providers, "tenant-b", max_attempts=1) as client:
        error = _refused(providers, client, request)
    assert error.code == grpc.StatusCode.UNAVAILABLE and "broke off" in str(error)
    after = _billed(providers, "tenant-b", before.requests, 1)
    assert after.requests == before.requests + 1
    # the prompt, and "Paris is the" (3 cl100k tokens: OpenAI reports no usage when cut)
    assert after.usage.output_tokens - before.usage.output_tokens == 3
    with _client(providers, "tenant-b") as client:
        again = client.complete(request)
    assert again.served_by == pb.LAYER_MODEL  # not an L1 hit of the broken answer


def test_a_stream_cut_before_anything_reached_the_caller_goes_to_another_replica(
    providers: ProviderStack,
) -> None:
    """gpt-4-1 has two replicas: a unary call whose stream broke off is answered by the other
    one (nothing had reached the caller); both calls are billed, the cut one never stored."""
    question = f"Cut and handed over {uuid.uuid4().hex[:8]}"
    _script_cut(providers, "gpt-4-1")
    before = providers.stack.totals("tenant-b")
    with _client(providers, "tenant-b", max_attempts=1) as client:
        answer = client.complete(ask("gpt-4-1", question))
    calls = [s for s in providers.server.seen_by("openai") if question in str(s.body)]
    assert len(calls) == 2 and calls[0].key != calls[1].key  # the other replica answered
    assert answer.stop_reason == "end_turn" and answer.content[0].text != "Paris is the"
    after = _billed(providers, "tenant-b", before.requests, 2)
    assert after.requests == before.requests + 2  # the cut call and the answer
    produced = after.usage.output_tokens - before.usage.output_tokens
    assert produced == answer.usage.output_tokens + 3  # the answer's, and the cut's 3
    _, chats = router_spans(providers.stack, answer.trace_id, calls=2)
    assert len(chats) == 2
    # each model call's span carries what it was billed; the cut one's came after its end
    (cut,) = [c for c in chats if c.attributes.get("error.type") == "replica_cut"]
    assert cut.attributes["gen_ai.usage.output_tokens"] == 3
    cut_cost = after.cost_nanos - before.cost_nanos - answer.cost.cost_nanos
    assert cut.attributes["cachemesh.cost_nanos"] == cut_cost > 0
    assert sum(c.attributes["cachemesh.cost_nanos"] for c in chats) == (
        after.cost_nanos - before.cost_nanos
    )


def test_a_request_cut_on_every_replica_is_not_retried_by_the_client_into_more_bills(
    providers: ProviderStack,
) -> None:
    """gpt-4-1 has two replicas and both cut the answer after its first pieces: the router
    hands the request over once (MAX_REPLICA_RETRIES, 2 model calls, both billed) and ends it
    UNAVAILABLE. Its trailer ``grpc-retry-pushback-ms: -1`` tells the default client's gRPC
    retry policy (5 attempts) not to send it again: each attempt was 2 more billed model calls
    (10 calls, 10 bills for one ``complete``, still failing)."""
    server = providers.server
    tag = f"Cut on every replica {uuid.uuid4().hex[:8]}"
    _answered_by(providers, "openai-1", tag)  # no failure counted from an earlier test
    _answered_by(providers, "openai-2", tag)
    cut = openai_wire.stream("gpt-4.1-2025-04-14", ["Paris", " is the"], None, cut_after=1)
    scripted = [Reply(events=cut, cut=True) for _ in range(10)]
    server.script("openai", *scripted)
    question = f"{tag} the question"
    before = providers.stack.totals("tenant-b")
    try:
        with _client(providers, "tenant-b") as client:  # gRPC's retries on (MAX_ATTEMPTS)
            error = _refused(providers, client, ask("gpt-4-1", question))
    finally:
        with server._lock:  # the cuts not used must not reach the next tests
            server.scripts["openai"] = [
                r for r in server.scripts["openai"] if not any(r is s for s in scripted)
            ]
    calls = [s for s in server.seen_by("openai") if question in str(s.body)]
    time.sleep(1.0)  # a bill of a retry, had there been one, lands in the background too
    after = _billed(providers, "tenant-b", before.requests, len(calls))
    print(
        f"\n{len(calls)} provider calls, {after.requests - before.requests} billed model "
        f"calls, {after.cost_nanos - before.cost_nanos} nanos; the client saw: {error}"
    )
    assert error.code == grpc.StatusCode.UNAVAILABLE and "broke off" in str(error)
    assert len(calls) == 2 and calls[0].key != calls[1].key  # each replica once, no retry
    assert after.requests - before.requests == 2
    _answered_by(providers, "openai-1", tag)  # back in service for the tests that follow
    _answered_by(providers, "openai-2", tag)


def test_an_openai_stream_cut_after_its_usage_is_answered_once_as_reported(
    providers: ProviderStack,
) -> None:
    """gpt-4-1 has two replicas: a stream whose finish_reason and usage chunk came, and whose
    connection was lost before [DONE], is the answer, billed as the provider reported it
    (its cache read credited), never rerun on the other replica (paid twice)."""
    question = f"Cut after its usage {uuid.uuid4().hex[:8]}"
    events = openai_wire.stream(
        "gpt-4.1-2025-04-14", ["Paris is ", "the capital."], openai_wire.usage(2006, 1920, 7)
    )
    assert events[-1] == (None, "[DONE]")
    providers.server.script("openai", Reply(events=events[:-1], cut=True))
    before = providers.stack.totals("tenant-b")
    with _client(providers, "tenant-b", max_attempts=1) as client:
        answer = client.complete(ask("gpt-4-1", question))
    calls = [s for s in providers.server.seen_by("openai") if question in str(s.body)]
    assert len(calls) == 1  # answered by the call that was cut after its end
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "Paris is the capital."
    assert answer.usage == pb.Usage(input_tokens=86, cache_read_input_tokens=1920, output_tokens=7)
    after = _billed(providers, "tenant-b", before.requests, 1)
    assert after.requests == before.requests + 1
    assert after.usage.cache_read_input_tokens - before.usage.cache_read_input_tokens == 1920


def test_a_provider_that_hangs_is_cut_at_the_deadline(providers: ProviderStack) -> None:
    """The router cuts a hung call at its deadline (UNAVAILABLE naming DEADLINE_EXCEEDED); a
    client that asked for no retry sees that, and the default client's retry is answered."""
    providers.server.script("anthropic", Reply(hang=True))
    question = f"Hang {uuid.uuid4().hex[:6]}"
    request = ask("claude-sonnet-4-5", question)
    request.request_id = uuid.uuid4().hex
    # a client deadline 3 s past the router's: long enough that only the router's deadline
    # (MODEL_TIMEOUT_S) cuts the call, short enough that a router holding its refusal back
    # after it (a wait, another try) is cut by the client's own deadline first
    with _client(providers, max_attempts=1, timeout_s=MODEL_TIMEOUT_S + 3) as client:
        error = _refused(providers, client, request)
    # answered at the router's deadline, by order: the router's refusal (UNAVAILABLE) reached
    # the client before its own deadline (DEADLINE_EXCEEDED)
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    assert f"DEADLINE_EXCEEDED (no answer within {MODEL_TIMEOUT_S:.1f} s)" in str(error)
    # one replica, one deadline (by cause and count, not by real time): one provider call, and
    # the router's one model call, given the router's deadline, ended at it
    calls = [s for s in providers.server.seen_by("anthropic") if question in str(s.body)]
    assert len(calls) == 1
    (chat,) = _router_chats(providers, request.request_id)
    assert chat.attributes.get("error.type") == "DEADLINE_EXCEEDED", chat.attributes
    assert 0 < int(str(chat.attributes["cachemesh.model_deadline_ms"])) <= MODEL_TIMEOUT_S * 1000

    providers.server.script("anthropic", Reply(hang=True))
    question = f"Hang then answer {uuid.uuid4().hex[:6]}"
    with _client(providers) as client:
        answer = client.complete(ask("claude-sonnet-4-5", question))
    assert answer.content[0].text == "Paris is the capital of France."
    calls = [s for s in providers.server.seen_by("anthropic") if question in str(s.body)]
    assert len(calls) == 2  # the hung call, cut; the client's retry, answered


# The client's deadline in the tests below: shorter than the router's own ROUTER_MODEL_TIMEOUT_S
# (MODEL_TIMEOUT_S, 4 s), so that only the client's deadline, carried down to the model replica,
# can tell the replica how long it has.
CLIENT_DEADLINE_S = 2.0
# When the loopback answers a hung provider call still open: after the client's deadline,
# before the router's. The replica, told the client's 2 s less the router's margin, cuts it
# about 1.9 s after it came (1.6 s to spare on a loaded machine); one holding it to the
# router's 4 s (or an SDK timeout of its own) is answered first.
HANG_ANSWER_S = MODEL_TIMEOUT_S - 0.5
# A retry-after the router's 4 s would let the replica wait for, but the client's 2 s does not
# (5 s, beyond both, was refused at once before the deadline was carried down too).
RETRY_AFTER_S = 3


def _model_span(providers: ProviderStack, request_id: str, replica: str) -> dict[str, object]:
    spans = spans_of_request(providers.stack, request_id, replica)
    (span,) = [s for s in spans if "cachemesh.deadline_ms" in s.attributes]
    return span.attributes


def test_a_retry_after_past_the_clients_deadline_is_not_waited_for(
    providers: ProviderStack,
) -> None:
    """claude-sonnet-4-5 has one replica. Its provider asks for a retry in 3 s; the client
    gave the request 2 s: the replica does not wait (nor retry), and the client hears at once
    why (UNAVAILABLE naming the retry-after and the deadline) instead of a bare timeout."""
    server = providers.server
    server.script(
        "anthropic",
        anthropic_wire.error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit.",
            {"retry-after": str(RETRY_AFTER_S)},
        ),
    )
    question = f"Deadline and retry-after {uuid.uuid4().hex[:8]}"
    request = ask("claude-sonnet-4-5", question)
    request.request_id = uuid.uuid4().hex
    with _client(providers, max_attempts=1, timeout_s=CLIENT_DEADLINE_S) as client:
        error = _refused(providers, client, request)
    # no retry-after wait, by order: the replica's refusal reached the client before the
    # client's own 2 s deadline (UNAVAILABLE, not DEADLINE_EXCEEDED), which a 3 s wait outlasts
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    assert f"retry-after ({RETRY_AFTER_S:.1f} s) outlasts the request's deadline" in str(error)
    assert "429 rate_limit_error" in str(error)
    calls = [s for s in server.seen_by("anthropic") if question in str(s.body)]
    assert [c.status for c in calls] == [429]  # no second try after a wait
    # the replica got the client's deadline (less the router's margin), not the router's 4 s,
    # and never slept for a retry
    model = _model_span(providers, request.request_id, "anthropic-1")
    assert 0 < int(str(model["cachemesh.deadline_ms"])) <= CLIENT_DEADLINE_S * 1000
    assert "cachemesh.provider.retries" not in model
    print(f"\nrefused: {error}")


def test_a_retry_after_past_the_clients_deadline_goes_to_the_next_replica_in_time(
    providers: ProviderStack,
) -> None:
    """gpt-4-1 has two replicas: the one whose provider asks for a 3 s wait hands over at
    once, and the other answers within the client's 2 s."""
    server = providers.server
    server.script(
        "openai",
        openai_wire.error(
            429,
            "requests",
            "Rate limit reached for gpt-4.1 in organization org-x on requests per min (RPM).",
            code="rate_limit_exceeded",
            headers={"retry-after": str(RETRY_AFTER_S)},
        ),
    )
    question = f"Deadline then the other replica {uuid.uuid4().hex[:8]}"
    with _client(providers, max_attempts=1, timeout_s=CLIENT_DEADLINE_S) as client:
        answer = client.complete(ask("gpt-4-1", question))
    calls = [s for s in server.seen_by("openai") if question in str(s.body)]
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].key != calls[1].key  # the other replica, not a wait on the first
    root, chats = router_spans(providers.stack, answer.trace_id)
    assert root.attributes["cachemesh.route_reason"] == "fallback"
    deadlines = [int(str(c.attributes["cachemesh.model_deadline_ms"])) for c in chats]
    assert len(deadlines) == 2 and all(0 < d <= CLIENT_DEADLINE_S * 1000 for d in deadlines)
    assert deadlines[1] <= deadlines[0]  # the second replica got what was left


def test_a_provider_that_hangs_is_cut_at_the_clients_deadline(providers: ProviderStack) -> None:
    """A client deadline shorter than the router's ROUTER_MODEL_TIMEOUT_S: the replica cuts
    the hung provider call at the client's deadline (it was told it), and the client gets
    DEADLINE_EXCEEDED."""
    # the provider answers the hung call HANG_ANSWER_S after it came if it is still open:
    # after the client's deadline (the replica's, less the router's margin, about 1.9 s after
    # the call came), before the router's (4 s, or the SDK's own timeout were it that)
    providers.server.script("anthropic", Reply(hang=True, hang_s=HANG_ANSWER_S))
    question = f"Hang past the client's deadline {uuid.uuid4().hex[:6]}"
    request = ask("claude-sonnet-4-5", question)
    request.request_id = uuid.uuid4().hex
    with _client(providers, max_attempts=1, timeout_s=CLIENT_DEADLINE_S) as client:
        error = _refused(providers, client, request)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    (hung,) = [s for s in providers.server.seen_by("anthropic") if question in str(s.body)]
    wait_until = time.monotonic() + 10
    while hung.ended is None:
        assert time.monotonic() < wait_until, "the hung provider call was never closed"
        time.sleep(0.05)
    # which cause closed it, by the provider's own record: the replica, at the client's
    # deadline, before the provider's answer came; a replica holding it to a later deadline
    # (the router's 4 s, an SDK timeout of its own) would have been answered
    assert not hung.outwaited, f"the provider answered after {hung.ended - hung.at:.2f} s"
    # cut at the client's 2 s, not the router's 4 s, by its cause (not by real time): the
    # router's one model call carried the client's deadline as its gRPC deadline and ended at
    # it, the replica was given that deadline, and the hung provider call was closed (above)
    (chat,) = _router_chats(providers, request.request_id)
    assert chat.attributes.get("error.type") == "DEADLINE_EXCEEDED", chat.attributes
    assert 0 < int(str(chat.attributes["cachemesh.model_deadline_ms"])) <= CLIENT_DEADLINE_S * 1000
    model = _model_span(providers, request.request_id, "anthropic-1")
    assert 0 < int(str(model["cachemesh.deadline_ms"])) <= CLIENT_DEADLINE_S * 1000
    print(f"\nhung call cut after {hung.ended - hung.at:.2f} s; the client saw: {error}")


def _answered_by(providers: ProviderStack, replica: str, tag: str) -> None:
    """Asks gpt-4-1 until ``replica`` answers one request whole (its health then resets; an
    ejected replica is reached by its probe once its cool-off has passed)."""
    server, key = providers.server, providers.keys[replica]
    deadline = time.monotonic() + 30
    with _client(providers, "tenant-b") as client:
        while True:
            question = f"{tag} {uuid.uuid4().hex[:6]}"
            client.complete(ask("gpt-4-1", question))
            if any(s.key == key for s in server.seen_by("openai") if question in str(s.body)):
                return
            assert time.monotonic() < deadline, f"{replica} never answered"
            time.sleep(0.2)


def test_a_replica_that_cuts_every_answer_after_its_first_token_is_ejected(
    providers: ProviderStack,
) -> None:
    """gpt-4-1 has two replicas. openai-1 cuts every answer right after its first token: a
    unary request sent there is cut and re-run on openai-2 (both calls billed). Its first
    token is no success: after three cuts in a row it is ejected and openai-2 serves alone
    (one probe, cut again, may reach it if the requests outlast ROUTER_EJECT_BASE_S's 5 s)."""
    server = providers.server
    key = providers.keys["openai-1"]
    tag = f"Cut after the first token {uuid.uuid4().hex[:8]}"
    _answered_by(providers, "openai-1", tag)  # no failure counted from an earlier test
    cut = openai_wire.stream("gpt-4.1-2025-04-14", ["Paris", " is the"], None, cut_after=1)
    server.script("openai", *(Reply(events=cut, cut=True, key=key) for _ in range(12)))
    try:
        with _client(providers, "tenant-b", max_attempts=1) as client:
            for i in range(12):
                answer = client.complete(ask("gpt-4-1", f"{tag} #{i}"))
                assert answer.content[0].text == "Paris is the capital of France."
    finally:
        with server._lock:  # the cuts not used must not reach the next tests
            server.scripts["openai"] = [r for r in server.scripts["openai"] if r.key != key]
    cut_calls = [
        s for s in server.seen_by("openai") if any(f"{tag} #{i}" in str(s.body) for i in range(12))
    ]
    cut_calls = [s for s in cut_calls if s.key == key]
    print(f"\n{len(cut_calls)} of 12 requests were cut on openai-1")
    assert 3 <= len(cut_calls) <= 4  # was every other request or more (6 to 12)
    _answered_by(providers, "openai-1", tag)  # back in service for the tests that follow


@pytest.mark.parametrize(
    ("api", "model", "status"),
    [("anthropic", "claude-sonnet-4-5", 529), ("openai", "gpt-4o-mini", 503)],
    ids=["anthropic", "openai"],
)
def test_a_provider_overloaded_on_every_try_is_retried_at_the_replica_only(
    providers: ProviderStack, api: str, model: str, status: int
) -> None:
    """The provider answers 529 (OpenAI: 503) to every try. Its replica tries it 3 times
    (PROVIDER_MAX_RETRIES 2) and says so; the front answers 529 / 503 with the replica's next
    backoff as retry-after and x-should-retry: false, so an SDK with its default retries (2)
    makes no more calls, nor does the gRPC client's channel (5 attempts). Before: 9 provider
    calls for one create() in 1.77 s (the replica's 3, times the SDK's 3 attempts), 15 for
    the gRPC client's one call."""
    server = providers.server
    if api == "openai":
        refusals = [openai_wire.error(503, "server_error", "overloaded") for _ in range(20)]
    else:
        refusals = [anthropic_wire.error(529, "overloaded_error", "Overloaded") for _ in range(20)]
    server.script(api, *refusals)
    tag = f"Overloaded {uuid.uuid4().hex[:8]}"
    front = f"http://{providers.stack.addresses['http-front']}"
    key = providers.stack.keys["tenant-a"]
    asked: Any = [{"role": "user", "content": tag}]
    error: anthropic.APIStatusError | openai.APIStatusError
    try:
        if api == "openai":  # the SDKs' default max_retries (2)
            with pytest.raises(openai.APIStatusError) as refused_openai:
                openai.OpenAI(base_url=front + "/v1", api_key=key).chat.completions.create(
                    model=model, max_tokens=64, messages=asked
                )
            error = refused_openai.value
        else:
            with pytest.raises(anthropic.APIStatusError) as refused_anthropic:
                anthropic.Anthropic(base_url=front, api_key=key).messages.create(
                    model=model, max_tokens=64, messages=asked
                )
            error = refused_anthropic.value
        sent = [s for s in server.seen_by(api) if tag in str(s.body)]
        with _client(providers) as client:  # gRPC's retries on (MAX_ATTEMPTS)
            refused = _refused(providers, client, ask(model, f"{tag} grpc"))
        by_grpc = [s for s in server.seen_by(api) if f"{tag} grpc" in str(s.body)]
    finally:
        with server._lock:  # the refusals not used must not reach the next tests
            server.scripts[api] = [r for r in server.scripts[api] if r not in refusals]
    assert error.status_code == status
    assert error.response.headers.get("x-should-retry") == "false"
    assert (error.response.headers.get("retry-after") or "").isdigit()
    assert "retried already" in str(error.body)
    assert len(sent) == 3  # the replica's tries, no SDK retry of them
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert getattr(refused, "retry_after_s", None) is not None
    assert len(by_grpc) == 3
