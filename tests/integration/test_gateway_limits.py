"""Per-tenant limits on real processes: routers of their own beside the session's stack (its
caches and replicas), each tenant with a key of its own.

- Two routers sharing one real Redis count one tenant's requests together: the 4th of 3 a
  minute is refused, through either router, with RESOURCE_EXHAUSTED and RetryInfo.
- A token rate: the second request waits for the tokens the first used (its usage, exactly),
  until the bucket holds what it reserves (its prompt and max_tokens).
- A daily budget: refused once the bill prefix-cache computed (its Totals) reaches it, until
  midnight UTC; the HTTP front answers 429 with retry-after from the RetryInfo.
- A router started while its Redis is down serves (without its limits and its answer ledger),
  and counts and records there once Redis is back.
"""

from __future__ import annotations

import calendar
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import grpc
import openai
import pytest

from cachemesh import Client, RateLimitError, build_request
from cachemesh.retry_info import retry_delay_s
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.auth import hash_key, new_api_key
from services.tools.stack.health import SERVING, probe, probe_http
from services.tools.stack.ports import free_port
from tests.integration.extra_processes import (
    Started,
    loopback,
    post_message,
    process,
    processes,
    service_env,
)
from tests.integration.harness import RunningStack
from tests.redis_server import redis_server, sync_client_of

pytestmark = pytest.mark.integration

# the limits store's wait: past the router's 0.5 s a loaded machine's admit is admitted unreserved
# (fail-open), and a refusal these tests assert would not come
LIMITS_TIMEOUT_S = "10"
TENANTS = ("limits-rate", "limits-other", "limits-tokens", "limits-budget", "limits-redis-down")


@dataclass
class Tenants:
    keys_file: Path
    keys: dict[str, str]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Tenants:
    keys = {tenant: new_api_key() for tenant in TENANTS}
    path = tmp_path_factory.mktemp("limits-keys") / "api-keys"
    path.write_text("".join(f"{t}:{hash_key(k)}\n" for t, k in keys.items()))
    return Tenants(path, keys)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits")


@contextmanager
def _router_cm(
    stack: RunningStack, tenants: Tenants, work: Path, name: str, limits: dict[str, str]
) -> Iterator[str]:
    with _routers_cm(stack, tenants, work, [name], limits) as (address,):
        yield address


@contextmanager
def _routers_cm(
    stack: RunningStack, tenants: Tenants, work: Path, names: list[str], limits: dict[str, str]
) -> Iterator[list[str]]:
    """Routers of the same ``limits``, started side by side."""
    addresses = [loopback() for _ in names]
    specs: list[Started] = []
    for name, address in zip(names, addresses, strict=True):
        extra = {
            "ROUTER_LISTEN": address,
            "CACHEMESH_API_KEYS_FILE": str(tenants.keys_file),
            "ROUTER_LIMITS_TIMEOUT_S": LIMITS_TIMEOUT_S,
        }
        env = service_env(stack, "router", {**extra, **limits})
        specs.append(("services.router", env, work / f"{name}.log", _serving(address)))
    with processes(specs):
        yield addresses


def _serving(address: str) -> Callable[[], bool]:
    return lambda: probe(address) == SERVING


def _ask(address: str, key: str, text: str, max_tokens: int = 16) -> pb.CompleteResponse:
    with Client(address, api_key=key, timeout_s=60) as client:
        return client.complete(
            build_request(
                f"{text} ({uuid.uuid4().hex[:8]})", model="sim-small", max_tokens=max_tokens
            )
        )


def _refused(address: str, key: str, text: str, max_tokens: int = 16) -> RateLimitError:
    with pytest.raises(RateLimitError) as caught:
        _ask(address, key, text, max_tokens)
    return caught.value


def _until_settled(url: str, tenant: str, settles: int = 1) -> None:
    """Waits until ``settles`` of ``tenant``'s answers are settled in the limits' Redis at
    ``url``: each one's settle, the one script that gives the bucket the tokens it did not use
    and adds its cost to the budgets, leaves a marker ``settled:<id>`` there for two minutes
    (services/router/redis_limits.py). A fixed sleep guessed how long that takes."""
    client = sync_client_of(url)
    pattern = f"cachemesh:limits:{{{tenant}}}:settled:*"  # RedisLimitStore's default prefix
    deadline = time.monotonic() + 30  # a bound on waiting, not a figure asserted
    try:
        while len(list(client.scan_iter(match=pattern))) < settles:
            assert time.monotonic() < deadline, f"{tenant}: fewer than {settles} settles"
            time.sleep(0.02)
    finally:
        client.close()


def test_two_routers_on_one_redis_share_a_tenants_request_rate(
    stack: RunningStack, tenants: Tenants, work: Path
) -> None:
    limits = {"ROUTER_LIMIT_REQUESTS_PER_MIN": "3"}
    with redis_server(work) as url:
        limits["ROUTER_LIMITS_REDIS_URL"] = url
        with _routers_cm(stack, tenants, work, ["rate-1", "rate-2"], limits) as (one, two):
            key = tenants.keys["limits-rate"]
            _ask(one, key, "What is a token bucket?")
            _ask(two, key, "What is a leaky bucket?")
            _ask(one, key, "What is GCRA?")
            for address in (two, one):  # the 4th and 5th, whichever router they reach
                error = _refused(address, key, "What is a sliding window?")
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "3 requests a minute" in error.message
                # one request refills every 20 s; the three were sent within this test
                assert error.retry_after_s is not None and 0 < error.retry_after_s <= 20
            # another tenant has its own count, on either router
            _ask(two, tenants.keys["limits-other"], "Is my count my own?")
            # the wire: RetryInfo in grpc-status-details-bin, and retry-after for plain clients
            with grpc.insecure_channel(one) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                with pytest.raises(grpc.RpcError) as raw:
                    stub.Complete(
                        build_request("And now?", model="sim-small", max_tokens=8),
                        metadata=(("authorization", f"Bearer {key}"),),
                        timeout=30,
                    )
            trailers: Any = raw.value.trailing_metadata()
            delay = retry_delay_s(trailers)
            assert delay is not None and 0 < delay <= 20
            retry_after = [value for name, value in trailers if name == "retry-after"]
            assert retry_after == [str(max(1, math.ceil(delay)))]


def test_token_rate_waits_for_the_tokens_an_answer_used(
    stack: RunningStack, tenants: Tenants, work: Path
) -> None:
    per_min = 10  # fewer than any one answer uses: the second request always waits
    # the limits in a Redis of their own (the store routers share), where the answer's settle
    # is seen done before the next request reads the bucket
    with (
        redis_server(work) as url,
        _router_cm(
            stack,
            tenants,
            work,
            "tokens",
            {"ROUTER_LIMIT_TOKENS_PER_MIN": str(per_min), "ROUTER_LIMITS_REDIS_URL": url},
        ) as router,
    ):
        key = tenants.keys["limits-tokens"]
        answer = _ask(router, key, "How are tokens counted?", max_tokens=256)
        # it ended before its max_tokens: it used fewer tokens than it reserved, so the wait
        # below is the usage's, not the reservation's (at 16, both were 31: a settle never
        # made, or not yet, passed)
        assert answer.stop_reason == "end_turn", answer
        used = (
            answer.usage.input_tokens
            + answer.usage.cache_creation_input_tokens
            + answer.usage.output_tokens
        )
        answered_at = time.monotonic()
        # the router settles the answer's tokens just after answering: the next step's admit
        # reads the bucket that settle wrote, so wait for the settle itself (its marker)
        _until_settled(url, "limits-tokens")
        error = _refused(router, key, "And now?", max_tokens=1)
        elapsed = time.monotonic() - answered_at
        assert "10 tokens a minute" in error.message
        assert error.reason == "RATE_LIMITED"  # the Gateway's ErrorInfo
        # its prompt and max_tokens reserve more than a minute's 10 tokens: it waits until the
        # bucket, at per_min - used (plus what refilled since), is full again
        assert "more than a minute's" in error.message
        expected = (per_min - (per_min - used)) * 60 / per_min
        assert error.retry_after_s is not None
        assert expected - elapsed - 1 <= error.retry_after_s <= expected + 0.01


def test_daily_budget_refuses_once_the_bill_reaches_it_until_midnight_utc(
    stack: RunningStack, tenants: Tenants, work: Path
) -> None:
    budget_nanos = 150_000  # $0.00015: a few short sim-small answers
    limits = {"ROUTER_BUDGET_USD_PER_DAY": "0.00015"}
    tenant = "limits-budget"
    key = tenants.keys[tenant]
    with (
        redis_server(work) as url,
        _router_cm(
            stack, tenants, work, "budget", {**limits, "ROUTER_LIMITS_REDIS_URL": url}
        ) as router,
    ):
        billed = 0
        answered = 0
        while billed < budget_nanos:
            answer = _ask(router, key, "What does this cost?", max_tokens=8)
            assert answer.cost.cost_nanos > 0 and not answer.cost.estimated
            billed += answer.cost.cost_nanos
            answered += 1
            assert answered <= 20, "the budget was never reached"
            # the router adds the bill just after answering: the next admit reads it
            _until_settled(url, tenant, answered)
        # the bill the budget counted is prefix-cache's own, to the nano-dollar
        totals = stack.totals(tenant)
        assert (totals.requests, totals.cost_nanos) == (answered, billed)
        # the wait named is the time to the next midnight UTC at some moment of the call: the
        # date read before and after it brackets that (no bound on how long the call took)
        before = time.time()
        error = _refused(router, key, "One more?")
        after = time.time()
        assert "daily budget of $0.00015 is spent" in error.message and "00:00 UTC" in error.message
        assert error.reason == "BUDGET_EXHAUSTED"  # the Gateway's ErrorInfo
        t = time.gmtime(before)
        midnight = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86_400
        assert error.retry_after_s is not None
        assert midnight - after - 1 <= error.retry_after_s <= midnight - before + 1

        # the HTTP front in front of this router: 429 with retry-after from the RetryInfo
        front = loopback()
        env = service_env(
            stack,
            "http-front",
            {
                "HTTP_FRONT_LISTEN": front,
                "HTTP_FRONT_GATEWAY_ADDR": router,
                "CACHEMESH_API_KEYS_FILE": str(tenants.keys_file),
            },
        )
        ready = lambda: probe_http(front) == SERVING  # noqa: E731
        with process("services.http_front", env, work / "front.log", ready):
            before = time.time()
            status, headers, body = post_message(f"http://{front}", key, "Over budget?")
            after = time.time()
            # the official SDKs raise their own RateLimitError (no retries: the wait is hours)
            ask = [{"role": "user", "content": "Over budget, SDK?"}]
            with pytest.raises(anthropic.RateLimitError) as by_anthropic:
                anthropic.Anthropic(
                    base_url=f"http://{front}", api_key=key, max_retries=0
                ).messages.create(model="sim-small", max_tokens=8, messages=ask)  # type: ignore[arg-type]
            assert "daily budget" in str(by_anthropic.value)
            with pytest.raises(openai.RateLimitError) as by_openai:
                openai.OpenAI(
                    base_url=f"http://{front}/v1", api_key=key, max_retries=0
                ).chat.completions.create(model="sim-small", max_tokens=8, messages=ask)  # type: ignore[arg-type]
            assert "daily budget" in str(by_openai.value)
        assert status == 429
        assert body["error"]["type"] == "rate_limit_error"
        assert "daily budget" in body["error"]["message"]
        wait = int(headers["retry-after"])  # whole seconds: 1 s either side for its rounding
        assert midnight - after - 1 <= wait <= midnight - before + 1


def test_a_router_started_while_its_redis_is_down_serves_and_counts_there_once_it_is_back(
    stack: RunningStack, tenants: Tenants, work: Path
) -> None:
    """A router restarted during an outage of its Redis (limits, answer ledger). Before, it
    exited 2 at every start (ConfigError), so the whole Gateway was down until Redis came back
    and then until the supervisor's backoff let it try again (1 of 78 calls answered in 40 s,
    12.6 s more after Redis was back). Now it starts SERVING and answers (without its limits
    and its protection across routers, as a running router does through the outage), and once
    Redis answers it counts the tenant's requests and records the answers there."""
    port = free_port()  # nothing listens there yet
    limits = {
        "ROUTER_LIMIT_REQUESTS_PER_MIN": "2",
        "ROUTER_LIMITS_REDIS_URL": f"redis://127.0.0.1:{port}/1",
        "ROUTER_ANSWERS_REDIS_URL": f"redis://127.0.0.1:{port}/2",
        "ROUTER_REDIS_BREAKER_S": "0",  # every request tries Redis: no wait for a breaker
    }
    key = tenants.keys["limits-redis-down"]
    with _router_cm(stack, tenants, work, "redis-down", limits) as router:
        for n in range(3):  # more than 2 a minute: nothing counts them
            answer = _ask(router, key, f"Is Redis there yet? ({n})")
            assert answer.cost.cost_nanos > 0
        log = (work / "redis-down.log").read_text()
        assert (
            f"ROUTER_LIMITS_REDIS_URL: Redis at redis://127.0.0.1:{port}/1 does not answer" in log
        )
        assert (
            f"ROUTER_ANSWERS_REDIS_URL: Redis at redis://127.0.0.1:{port}/2 does not answer" in log
        )
        (work / "redis-down").mkdir()
        with redis_server(work / "redis-down", port=port):
            _ask(router, key, "And now?")
            _ask(router, key, "And again?")
            error = _refused(router, key, "One more?")  # counted in Redis: the 3rd of 2
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            ledger = sync_client_of(f"redis://127.0.0.1:{port}/2")
            try:
                assert len(ledger.keys("cachemesh:answer:*")) == 2  # both answers recorded
            finally:
                ledger.close()
