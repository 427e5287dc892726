"""A llama-server replica that restarts mid-conversation (its KV cache gone), on the real
engine (``test_llama_engine``'s stack, started afresh for this module): the turn after the
restart is answered, billed with the reuse of the engine that answered it (none), not the
view's stale warm prefix; the turn after that reads its prefix again.

The router still predicts the restarted replica warm for that turn (nothing told it of the
restart). Its call there stalls (the restarted engine is held stopped, SIGSTOP, until the
call is over: a cold prefill that would overrun the predicted warm one on a slow machine, on
any machine) and is handed over to the other replica, which prefills it again. A stalled call
makes no commit of its own, so the WARM of the replica that took it over names the stalled
one (``stalled_warm_replicas``) and prefix-cache's view loses that conversation's blocks
there from the first one a lost prefix must have taken for the call to stall (2m - P: m of
the prompt's P tokens predicted warm; a shared system prompt below it stays for the other
conversations): it predicts at most that much of the next turn there, less than the stalled
turn's prediction, and the chooser sends the turn to the replica that took it over (before,
the view kept predicting the whole prompt there, and every turn of the conversation was sent
there as warm, to stall too)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.common.kv_blocks import BLOCK_SIZE
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import EngineOptions, LlamaServers, _alive
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


def test_a_replica_restarted_mid_conversation_stalls_once_and_the_view_forgets_it_there(
    llama: LlamaStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tag = uuid.uuid4().hex
    system = f"Session {tag}. You answer questions about the Contoso parcel rates. " + " ".join(
        f"Rate {i}: a parcel of {1 + i % 7} kg to zone {i} costs {4 + i} dollars."
        for i in range(12)
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
    (restarted,) = again.start([engine.port])
    # held stopped: its socket takes the call, nothing answers it (a stall, whatever the speed)
    os.kill(restarted.pid, signal.SIGSTOP)
    stopped = True
    try:
        turns += [_assistant(_text(two)), _user("And to zone 9?")]
        stalled = _request(system, turns)
        three = llama.client.complete(stalled)
        root, _ = harness.router_spans(llama.sink, three.trace_id)
        calls = _chats(llama, three.trace_id)
        print(
            f"\nafter the restart: {root.attributes['cachemesh.replica']} (was {replica}); "
            f"calls: {[(c['cachemesh.replica'], c['cachemesh.kv_match_tokens']) for c in calls]}"
        )
        # the view predicted the restarted replica warm (nothing told it of the restart), its
        # call stalled and was handed over to the other replica, which answered
        assert len(calls) == 2, calls
        first, second = calls
        assert first["cachemesh.replica"] == replica, calls
        assert first["cachemesh.route_reason"] != "fallback", calls
        assert first["cachemesh.kv_match_tokens"] > 0, calls
        assert first["error.type"] == "DEADLINE_EXCEEDED", calls  # the stall's hand-over
        assert second["cachemesh.replica"] != replica, calls
        assert second["cachemesh.route_reason"] == "fallback", calls
        assert root.attributes["cachemesh.replica"] == second["cachemesh.replica"]
        # billed the reuse of the replica that answered: none (it never saw this conversation)
        assert three.usage.cache_read_input_tokens < 16, three.usage
        assert three.served_by == pb.LAYER_MODEL
        assert not three.cost.estimated and three.cost.cost_nanos == _hand_bill(three.usage)

        # what the view now predicts the restarted replica holds of the next turn: no more
        # than a lost prefix must have left for the stall (held < 2m - P, m of the stalled
        # turn's P tokens predicted warm: the blocks from there on went, those below it may be
        # a prefix other conversations share), less than the stalled turn's own prediction
        tenant = str(root.attributes["cachemesh.tenant"])
        match = int(first["cachemesh.kv_match_tokens"])
        _, stalled_tokens = _predicted(llama, tenant, stalled, replica)
        kept = max(2 * match - stalled_tokens, 0) // BLOCK_SIZE * BLOCK_SIZE
        turns += [_assistant(_text(three)), _user("And to zone 11?")]
        predicted, prompt_tokens = _predicted(llama, tenant, _request(system, turns), replica)
        print(
            f"the view predicts {predicted} of {prompt_tokens} tokens on {replica} (the "
            f"stalled turn's {match} of {stalled_tokens} predicted: {kept} at most kept)"
        )
        assert predicted <= kept < match, (predicted, kept, match, stalled_tokens)
        os.kill(restarted.pid, signal.SIGCONT)
        stopped = False

        four = llama.client.complete(_request(system, turns))
        four_root, _ = harness.router_spans(llama.sink, four.trace_id)
        assert four_root.attributes["cachemesh.replica"] == second["cachemesh.replica"]
        assert four.usage.cache_read_input_tokens > 0.5 * (
            four.usage.input_tokens + four.usage.cache_read_input_tokens
        ), four.usage
        assert four.served_by == pb.LAYER_PREFIX_CACHE
    finally:
        if stopped:
            os.kill(restarted.pid, signal.SIGCONT)
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
