"""An answer still running at its call's deadline: the provider replica ends it itself, a
margin before the gRPC deadline, with ``end.interrupted`` carrying the usage the provider
reported so far, so the router bills the provider's figures (here a 5,000-token cache write)
and not Plan's estimate. Before, the replica spent the whole deadline, the gRPC deadline fired
first and the end, with its usage, was never sent."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from cachemesh import CachemeshError, Client
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, model_pb2_grpc
from tests.integration.provider_stack import ProviderStack, ask
from tests.providers import anthropic_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

DEADLINE_S = 2.0  # the call's deadline, as the router sets it (a client's 2 s)
STALL_S = 60.0  # the provider's stall after " there": far beyond any deadline here
INPUT, CACHE_WRITE = 12, 5000


def _stalled_answer() -> Reply:
    """message_start reports 12 input and 5,000 cache-write tokens; "Hello", " there", then
    the stream stalls (event 5 would be the third text delta)."""
    events = anthropic_wire.stream(
        "claude-sonnet-4-5-20250929",
        ["Hello", " there", " and the rest."],
        anthropic_wire.Usage(input_tokens=INPUT, cache_creation_5m=CACHE_WRITE, output_tokens=9),
    )
    assert events[5][0] == "content_block_delta"
    return Reply(events=events, pauses={5: STALL_S})


async def _generate(address: str, token: str, request: pb.CompleteRequest) -> list[object]:
    """The replica's chunks for a Generate with the router's deadline, through grpc.aio as the
    router calls it; the call's failure, if any, last."""
    got: list[object] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = model_pb2_grpc.ModelStub(channel)
        call = stub.Generate(
            model_pb2.GenerateRequest(tenant="tenant-a", model=request.model, request=request),
            timeout=DEADLINE_S,
            metadata=(("x-cachemesh-internal", token),),
        )
        try:
            async for chunk in call:
                got.append(chunk)
        except grpc.aio.AioRpcError as exc:
            got.append(exc.code())
    return got


async def test_the_replica_ends_an_answer_cut_by_its_deadline_with_the_providers_usage(
    providers: ProviderStack,
) -> None:
    providers.server.script("anthropic", _stalled_answer())
    request = ask("claude-sonnet-4-5", f"Deadline usage {uuid.uuid4().hex[:8]}")
    replica = providers.replicas["anthropic-1"]
    got = await _generate(replica, providers.stack.internal_token, request)
    assert isinstance(got[-1], model_pb2.GenerateChunk), f"no end, the call failed: {got[-1]}"
    end = got[-1].end
    assert got[-1].WhichOneof("part") == "end" and end.interrupted, got[-1]
    assert "deadline" in end.error
    texts = [c.text for c in got if isinstance(c, model_pb2.GenerateChunk) and c.text]
    assert "".join(texts) == "Hello there"
    usage = end.provider_usage.anthropic
    assert (usage.input_tokens, usage.cache_creation_input_tokens) == (INPUT, CACHE_WRITE)
    assert usage.cache_creation.ephemeral_5m_input_tokens == CACHE_WRITE
    assert usage.output_tokens == end.output_tokens == 2  # "Hello there", cl100k


def test_the_router_bills_the_providers_usage_of_an_answer_cut_by_its_deadline(
    providers: ProviderStack,
) -> None:
    """Through the Gateway with a client's 2 s deadline: the client hears DEADLINE_EXCEEDED
    and the call is billed as the provider reported it (claude-sonnet-4-5: $3 in, $3.75 5m
    write, $15 out per MTok = 3000 / 3750 / 15000 nanos a token)."""
    providers.server.script("anthropic", _stalled_answer())
    before = providers.stack.totals("tenant-b")
    client = Client(
        providers.stack.target,
        api_key=providers.stack.keys["tenant-b"],
        max_attempts=1,
        timeout_s=DEADLINE_S,
    )
    with client, pytest.raises(CachemeshError) as caught:
        list(client.stream(ask("claude-sonnet-4-5", f"Deadline bill {uuid.uuid4().hex[:8]}")))
    providers.errors.append(str(caught.value))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
    deadline = time.monotonic() + 20
    while (after := providers.stack.totals("tenant-b")).requests == before.requests:
        assert time.monotonic() < deadline, "the cut answer was never billed"
        time.sleep(0.1)
    written = after.usage.cache_creation_input_tokens - before.usage.cache_creation_input_tokens
    print(f"\nbilled {written} cache-write tokens, {after.cost_nanos - before.cost_nanos} nanos")
    assert written == CACHE_WRITE  # the provider's report, not Plan's estimate
    assert after.usage.input_tokens - before.usage.input_tokens == INPUT
    assert after.usage.output_tokens - before.usage.output_tokens == 2
    assert after.cost_nanos - before.cost_nanos == INPUT * 3000 + CACHE_WRITE * 3750 + 2 * 15000
