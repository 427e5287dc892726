"""A deadline that passes after the provider reported the prompt's usage but before its first
token. Anthropic's message_start reports the prompt (12 input and 5,000 cache-write tokens
here), which it bills once its prefill began; the stream then stalls before any content. The
replica ends the call a margin before its deadline with a start and an interrupted end
carrying that usage, so the router bills the provider's figures. Before, the call failed
DEADLINE_EXCEEDED without a start and the router billed nothing.

OpenAI reports nothing before the first token (its usage chunk, which
``stream_options.include_usage`` asks for, comes after the finish_reason): there is nothing to
bill from, and such a call still fails as before."""

from __future__ import annotations

import time
import urllib.request
import uuid
from dataclasses import replace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import CachemeshError, Client
from cachemesh.v1 import model_pb2
from tests.integration.provider_stack import ProviderStack, ask
from tests.integration.test_provider_deadline_usage import DEADLINE_S, STALL_S, _generate
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

INPUT, CACHE_WRITE = 12, 5000


def _stalled_before_content() -> Reply:
    """message_start reports 12 input and 5,000 cache-write tokens; the stream then stalls
    before its first content block (event 1)."""
    events = anthropic_wire.stream(
        "claude-sonnet-4-5-20250929",
        ["Hello"],
        anthropic_wire.Usage(input_tokens=INPUT, cache_creation_5m=CACHE_WRITE, output_tokens=1),
    )
    assert events[0][0] == "message_start" and events[1][0] == "content_block_start"
    return Reply(events=events, pauses={1: STALL_S})


async def test_the_replica_ends_a_call_cut_before_its_first_token_with_the_reported_usage(
    providers: ProviderStack,
) -> None:
    providers.server.script("anthropic", _stalled_before_content())
    request = ask("claude-sonnet-4-5", f"Prestart usage {uuid.uuid4().hex[:8]}")
    replica = providers.replicas["anthropic-1"]
    got = await _generate(replica, providers.stack.internal_token, request)
    chunks = [c for c in got if isinstance(c, model_pb2.GenerateChunk)]
    assert len(chunks) == len(got), f"the call failed: {got}"
    assert [c.WhichOneof("part") for c in chunks] == ["start", "end"], got
    start, end = chunks[0].start, chunks[1].end
    assert start.prompt_tokens == INPUT + CACHE_WRITE
    assert start.cut_before_first_token  # no first token: the router's health rule, no rate
    assert end.interrupted and "deadline" in end.error and end.output_tokens == 0
    usage = end.provider_usage.anthropic
    assert (usage.input_tokens, usage.cache_creation_input_tokens) == (INPUT, CACHE_WRITE)
    assert usage.cache_creation.ephemeral_5m_input_tokens == CACHE_WRITE
    assert usage.output_tokens == 0


def test_the_router_bills_the_prompt_of_a_call_cut_before_its_first_token(
    providers: ProviderStack,
) -> None:
    """Through the Gateway with a client's 2 s deadline: DEADLINE_EXCEEDED, saying it was
    billed, and the prompt billed at the provider's figures (claude-sonnet-4-5: $3 in and
    $3.75 a 5m write per MTok = 3000 / 3750 nanos a token)."""
    providers.server.script("anthropic", _stalled_before_content())
    before = providers.stack.totals("tenant-b")
    client = Client(
        providers.stack.target,
        api_key=providers.stack.keys["tenant-b"],
        max_attempts=1,
        timeout_s=DEADLINE_S,
    )
    with client, pytest.raises(CachemeshError) as caught:
        list(client.stream(ask("claude-sonnet-4-5", f"Prestart bill {uuid.uuid4().hex[:8]}")))
    providers.errors.append(str(caught.value))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
    assert "billed" in str(caught.value), caught.value
    deadline = time.monotonic() + 20
    while (after := providers.stack.totals("tenant-b")).requests == before.requests:
        assert time.monotonic() < deadline, "the call cut before its first token was never billed"
        time.sleep(0.1)
    written = after.usage.cache_creation_input_tokens - before.usage.cache_creation_input_tokens
    print(f"\nbilled {written} cache-write tokens, {after.cost_nanos - before.cost_nanos} nanos")
    assert written == CACHE_WRITE
    assert after.usage.input_tokens - before.usage.input_tokens == INPUT
    assert after.usage.output_tokens - before.usage.output_tokens == 0
    assert after.cost_nanos - before.cost_nanos == INPUT * 3000 + CACHE_WRITE * 3750


def _ejections(providers: ProviderStack, model: str) -> float:
    """The router's count of ``model``'s replica ejections."""
    address = providers.stack.stack.metrics_addresses["router"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "cachemesh_router_replica_ejections_total"
                and sample.labels.get("model") == model
            ):
                return float(sample.value)
    return 0.0


def test_a_replica_stalling_after_every_usage_report_is_ejected(providers: ProviderStack) -> None:
    """anthropic-1, claude-sonnet-4-5's one replica, stalls every call after message_start:
    each is billed its reported prompt and fails DEADLINE_EXCEEDED, and counts against the
    replica as a call with no start by its deadline did: ejected after the third (an ``auto``
    request would then try another tier first). Before, its start at the deadline looked like
    a first report and it stayed in service, every request waiting out its deadline there.

    The stack is the session's: earlier tests leave anthropic-1 failures in a row (a hang cut
    at the client's deadline, a retry-after refused, this module's billed cut) or ejected, and
    an ejected replica's failures eject it no further. One whole answer first resets it."""
    key = providers.keys["anthropic-1"]
    tag = f"Prestart stall {uuid.uuid4().hex[:8]}"
    client = Client(
        providers.stack.target,
        api_key=providers.stack.keys["tenant-b"],
        max_attempts=1,
        timeout_s=DEADLINE_S,
    )
    with client:
        assert client.complete(ask("claude-sonnet-4-5", f"{tag} first")).content
        before = _ejections(providers, "claude-sonnet-4-5")
        stalled = _stalled_before_content()
        providers.server.script("anthropic", *(replace(stalled, key=key) for _ in range(3)))
        counts = []
        for i in range(3):
            with pytest.raises(CachemeshError) as caught:
                list(client.stream(ask("claude-sonnet-4-5", f"{tag} #{i}")))
            providers.errors.append(str(caught.value))
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert "billed" in str(caught.value), caught.value
            counts.append(_ejections(providers, "claude-sonnet-4-5") - before)
        print(f"\nclaude-sonnet-4-5 ejections after each of 3 stalled calls: {counts}")
        # one whole answer brings the replica back for the tests that follow
        assert client.complete(ask("claude-sonnet-4-5", f"{tag} answered")).content
    assert counts == [0, 0, 1]


def test_a_stall_cut_at_the_model_timeout_with_no_replica_left_is_the_routers_deadline(
    providers: ProviderStack,
) -> None:
    """A client's 60 s deadline against ROUTER_MODEL_TIMEOUT_S (4 s): the call cut there sent
    the client nothing, so the router hands the request on (another replica would answer it:
    the unit tests); claude-sonnet-4-5 has no other replica, so the client gets the router's
    DEADLINE_EXCEEDED (not UNAVAILABLE, which the client would retry into a second bill), the
    prompt billed once, as the provider reported it."""
    key = providers.keys["anthropic-1"]
    tag = f"Prestart handed on {uuid.uuid4().hex[:8]}"
    providers.server.script("anthropic", replace(_stalled_before_content(), key=key))
    before = providers.stack.totals("tenant-b")
    client = Client(
        providers.stack.target,
        api_key=providers.stack.keys["tenant-b"],
        max_attempts=1,
        timeout_s=60.0,
    )
    with client:
        with pytest.raises(CachemeshError) as caught:
            list(client.stream(ask("claude-sonnet-4-5", f"{tag} stalled")))
        providers.errors.append(str(caught.value))
        print(f"\n{caught.value}")
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
        assert "ROUTER_MODEL_TIMEOUT_S" in str(caught.value), caught.value
        assert "as the provider reported it" in str(caught.value), caught.value
        deadline = time.monotonic() + 20
        while (after := providers.stack.totals("tenant-b")).requests == before.requests:
            assert time.monotonic() < deadline, "the stalled call was never billed"
            time.sleep(0.1)
        written = after.usage.cache_creation_input_tokens - before.usage.cache_creation_input_tokens
        assert written == CACHE_WRITE and after.requests == before.requests + 1
        # one whole answer clears the failure it counted, for the tests that follow
        assert client.complete(ask("claude-sonnet-4-5", f"{tag} answered")).content


async def test_an_openai_call_cut_before_its_first_token_has_no_usage_to_bill(
    providers: ProviderStack,
) -> None:
    """OpenAI's role chunk carries no usage (``"usage": null``): the replica has no report, sends
    no start, and the call fails DEADLINE_EXCEEDED as before."""
    events = openai_wire.stream(
        "gpt-4.1-2025-04-14", ["Hello"], openai_wire.usage(prompt=12, cached=0, completion=1)
    )
    providers.server.script("openai", Reply(events=events, pauses={1: STALL_S}))
    request = ask("gpt-4-1", f"Prestart openai {uuid.uuid4().hex[:8]}")
    got = await _generate(providers.replicas["openai-1"], providers.stack.internal_token, request)
    assert got == [grpc.StatusCode.DEADLINE_EXCEEDED], got
