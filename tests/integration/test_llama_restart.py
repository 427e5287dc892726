"""A llama-server replica that restarts mid-conversation (its KV cache gone), on the real
engine (``test_llama_engine``'s stack, started afresh for this module): the turn after the
restart is answered (the model process's pooled connection to the old engine is dead), billed
with the reuse of the engine that answered it (none), not the view's stale warm prefix; the
turn after that reads its prefix again.

The router still predicts the restarted replica warm for that turn (nothing told it of the
restart): its call there either answers, its engine's report of no reuse correcting
prefix-cache's view at its FINAL, or, its cold prefill running past the predicted one, stalls
and is handed over to the other replica, which prefills it again. A stalled call makes no
commit of its own, so the WARM of the replica that took it over names the stalled one
(``stalled_warm_replicas``) and the view takes that as a report of nothing reused there.
Either way, after that turn the view predicts the restarted replica holds no more of the
conversation than its engine does (before, the stall left the view predicting the whole
second turn's prompt there while the engine held one batch of it, the stalled call's
prefill: the next turn of every conversation it held was sent there as warm, to stall too)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import grpc
import openai
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import UPSTREAM_ID, EngineOptions, LlamaServers, _alive
from services.tools.stack.environment import tool_settings
from tests.integration import harness
from tests.integration.test_llama_engine import (
    CONTEXT_TOKENS,
    MODEL,
    LlamaStack,
    _assistant,
    _hand_bill,
    _request,
    _text,
    _user,
    llama,
)

pytestmark = pytest.mark.integration
__all__ = ["llama"]  # the module's own stack (a module-scoped fixture)


def test_a_replica_restarted_mid_conversation_answers_and_bills_its_lost_prefix_as_input(
    llama: LlamaStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tag = uuid.uuid4().hex
    system = f"Session {tag}. You answer questions about the Contoso parcel rates. " + " ".join(
        f"Rate {i}: a parcel of {1 + i % 7} kg to zone {i} costs {4 + i} dollars."
        for i in range(48)  # many batches of the engine's prefill: the stalled call runs one
    )
    turns = [_user("How much is a parcel to zone 3?")]
    one = llama.client.complete(_request(system, turns))
    replica = harness.router_spans(llama.sink, one.trace_id)[0].attributes["cachemesh.replica"]
    turns += [_assistant(_text(one)), _user("And to zone 5?")]
    two = llama.client.complete(_request(system, turns))
    assert harness.router_spans(llama.sink, two.trace_id)[0].attributes["cachemesh.replica"] == (
        replica
    )
    assert two.usage.cache_read_input_tokens > 0.5 * (
        two.usage.input_tokens + two.usage.cache_read_input_tokens
    ), two.usage

    # the engine behind that model process restarts: same port, an empty KV cache
    engine = llama.by_model_address[replica]
    os.kill(engine.pid, signal.SIGKILL)
    while _alive(engine.pid):  # its port free again
        time.sleep(0.05)
    paths = engine_paths(tool_settings(harness.ROOT, os.environ))
    again = LlamaServers(
        paths, tmp_path_factory.mktemp("restarted"), EngineOptions(1, 1, CONTEXT_TOKENS)
    )
    again.start([engine.port])
    try:
        turns += [_assistant(_text(two)), _user("And to zone 9?")]
        three = llama.client.complete(_request(system, turns))
        root, _ = harness.router_spans(llama.sink, three.trace_id)
        calls = _chats(llama, three.trace_id)
        print(
            f"\nafter the restart: {root.attributes['cachemesh.replica']} (was {replica}), "
            f"{root.attributes['cachemesh.route_reason']}, read "
            f"{three.usage.cache_read_input_tokens} of {three.usage.input_tokens} + that; "
            f"calls: {[(c['cachemesh.replica'], c['cachemesh.kv_match_tokens']) for c in calls]}"
        )
        # the view predicted the restarted replica warm (nothing told it of the restart)
        assert calls[0]["cachemesh.replica"] == replica, calls
        assert calls[0]["cachemesh.kv_match_tokens"] > 0, calls
        # whichever answered held none of it: the restarted engine, or the other (a stall
        # handed over) that never saw this conversation
        assert three.usage.cache_read_input_tokens < 16, three.usage
        assert three.served_by == pb.LAYER_MODEL
        assert not three.cost.estimated and three.cost.cost_nanos == _hand_bill(three.usage)
        # what the view now predicts the restarted replica holds of the next turn
        tenant = str(root.attributes["cachemesh.tenant"])
        next_turns = [*turns, _assistant(_text(three)), _user("And to zone 11?")]
        predicted = _predicted(llama, tenant, _request(system, next_turns), replica)
        turns += [_assistant(_text(three)), _user("And to zone 11?")]
        four = llama.client.complete(_request(system, turns))
        assert four.usage.cache_read_input_tokens > 0.5 * (
            four.usage.input_tokens + four.usage.cache_read_input_tokens
        ), four.usage
        assert four.served_by == pb.LAYER_PREFIX_CACHE

        # the restarted engine's own count of what it holds of that turn (asked last: the
        # question makes it hold it), against the view's: no more, as shares of the prompt
        held = _engine_reuse(engine.base_url, system, next_turns)
        print(f"the view predicted {predicted} there; its engine held {held}")
        assert predicted[0] / predicted[1] <= held[0] / held[1] + 0.1, (predicted, held)
    finally:
        again.stop()


def _chats(llama: LlamaStack, trace_id: str) -> list[dict[str, Any]]:
    """The attributes of the router's model-call spans of the trace (the root span exported:
    each ended before it), the chooser's pick first (a call it handed over as stalled; the one
    that took the request over was routed as a fallback)."""
    chats = [
        s.attributes
        for s in llama.sink.spans_of(trace_id)
        if s.service == "router" and s.name.startswith("chat ")
    ]
    return sorted(chats, key=lambda a: a.get("cachemesh.route_reason") == "fallback")


def _predicted(
    llama: LlamaStack, tenant: str, request: pb.CompleteRequest, replica: str
) -> tuple[int, int]:
    """prefix-cache's view of ``replica`` for ``request`` (a Plan: no side effect on the view's
    contents), and the prompt's tokens (the view's count)."""
    token = (llama.stack.run_dir / "internal-token").read_text().strip()
    with grpc.insecure_channel(llama.stack.addresses["prefix-cache"]) as channel:
        plan: pc.PlanResponse = prefix_cache_pb2_grpc.PrefixCacheStub(channel).Plan(
            pc.PlanRequest(tenant=tenant, model=MODEL, request=request, replicas=[replica]),
            metadata=(("x-cachemesh-internal", token),),
            timeout=30,
        )
    return plan.candidates[0].warm_prefix_tokens, plan.prompt_tokens


def _engine_reuse(base_url: str, system: str, turns: list[pb.Message]) -> tuple[int, int]:
    """The engine's reuse of this conversation's prompt, asked directly, and its count of it."""
    roles = {pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
    messages: list[Any] = [{"role": "system", "content": system}]
    messages += [{"role": roles[m.role], "content": m.content[0].text} for m in turns]
    answer = openai.OpenAI(base_url=base_url, api_key="none").chat.completions.create(
        model=UPSTREAM_ID, max_tokens=1, messages=messages
    )
    assert answer.usage is not None
    details = answer.usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return cached, answer.usage.prompt_tokens
