"""Through the Gateway, a provider upstream that ignores max_tokens=50 and writes 6 MB (a
misbehaving engine or proxy, model-upstream's case): the replica cuts it once its text passes
``cut_at(50, exact=True)`` (114 tokens by our count: an OpenAI row), closes its connection,
and the answer ends ``max_tokens`` with the text so far, billed what the upstream wrote by
then, streamed or not. Before the cut it wrote on until the deadline and was billed 213,740
output tokens, 128,245,800 nanos on gpt-4o-mini ($0.15 in, $0.60 out per MTok: 150 / 600
nanos a token)."""

from __future__ import annotations

import time
import uuid

import pytest

from cachemesh import Client
from cachemesh.v1 import gateway_pb2 as pb
from services.model.providers.output_cut import cut_at
from tests.integration.provider_stack import ProviderStack, ask
from tests.providers import openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration

GPT = "gpt-4o-mini"
MAX_TOKENS = 50
RUNAWAY = ["x" * 1000 + " "] * 6000  # ~6 MB in 6,000 deltas, ~12 s at the server's pace


def _runaway(providers: ProviderStack) -> int:
    """Script the runaway as the next OpenAI answer. The server is the session's: its record
    is not cleared (another test counts calls made before it), and a reply an earlier test
    left unused would be taken first, so there must be none."""
    assert providers.server.pending("openai") == [], "an earlier test left a scripted reply"
    events = openai_wire.stream(GPT, RUNAWAY, openai_wire.usage(20, 0, MAX_TOKENS))
    providers.server.script("openai", Reply(events=events))
    return len(events)


def _checked(
    providers: ProviderStack,
    question: str,
    events: int,
    answer: pb.CompleteResponse,
    took: float,
) -> None:
    (seen,) = [s for s in providers.server.seen_by("openai") if question in str(s.body)]
    usage, cost = answer.usage, answer.cost.cost_nanos
    print(
        f"\nstop {answer.stop_reason}, {usage.output_tokens} output tokens, {cost:,} nanos, "
        f"{seen.sent} of {events} events written, {took:.2f} s"
    )
    assert answer.stop_reason == "max_tokens"
    # the first delta (1,001 bytes) passes the cut: what it wrote, by our count
    assert cut_at(MAX_TOKENS, exact=True) < usage.output_tokens < 1000  # was 213,740
    assert cost == usage.input_tokens * 150 + usage.output_tokens * 600  # was 128,245,800
    # the upstream stopped: its connection was closed (6,000 events at its pace take ~12 s; the
    # time taken is printed, not asserted: a loaded machine's clock proves nothing)
    assert seen.sent < 200


def test_a_runaway_upstream_is_cut_for_a_complete(providers: ProviderStack) -> None:
    events = _runaway(providers)
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        question = f"Runaway {uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        answer = client.complete(ask(GPT, question, max_tokens=MAX_TOKENS))
        took = time.monotonic() - started
    text = "".join(block.text for block in answer.content)
    assert text.startswith("x" * 1000)
    _checked(providers, question, events, answer, took)


def test_a_runaway_upstream_is_cut_for_a_stream(providers: ProviderStack) -> None:
    events = _runaway(providers)
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        question = f"Runaway stream {uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        request = ask(GPT, question, max_tokens=MAX_TOKENS)
        chunks = list(client.stream(request))
        took = time.monotonic() - started
    (end,) = [c.end for c in chunks if c.WhichOneof("part") == "end"]
    text = "".join(c.delta.text for c in chunks if c.WhichOneof("part") == "delta")
    assert text.startswith("x" * 1000)
    _checked(providers, question, events, end, took)
