"""A llama-server replica that restarts mid-conversation (its KV cache gone), on the real
engine (``test_llama_engine``'s stack, started afresh for this module): the turn after the
restart is answered (the model process's pooled connection to the old engine is dead), billed
with the engine's reuse (none), not the view's stale warm prefix; the turn after that reads
its prefix again. (The router still predicts the restarted replica warm: that turn's call
there, cold, runs past its predicted prefill and is handed to the other replica as stalled,
which prefills it again; the engine tells its reuse only at a call's end, so the view learns of
the restart only from a call that ends there.)"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import EngineOptions, LlamaServers, _alive
from services.tools.stack.environment import tool_settings
from tests.integration import harness
from tests.integration.test_llama_engine import (
    CONTEXT_TOKENS,
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
    again.start([engine.port])
    try:
        turns += [_assistant(_text(two)), _user("And to zone 9?")]
        three = llama.client.complete(_request(system, turns))
        root, _ = harness.router_spans(llama.sink, three.trace_id)
        print(
            f"\nafter the restart: {root.attributes['cachemesh.replica']} (was {replica}), "
            f"{root.attributes['cachemesh.route_reason']}, read "
            f"{three.usage.cache_read_input_tokens} of {three.usage.input_tokens} + that"
        )
        if root.attributes["cachemesh.replica"] == replica:  # the restarted engine: none reused
            assert three.usage.cache_read_input_tokens < 16, three.usage
            assert three.served_by == pb.LAYER_MODEL
        assert not three.cost.estimated and three.cost.cost_nanos == _hand_bill(three.usage)

        turns += [_assistant(_text(three)), _user("And to zone 11?")]
        four = llama.client.complete(_request(system, turns))
        assert four.usage.cache_read_input_tokens > 0.5 * (
            four.usage.input_tokens + four.usage.cache_read_input_tokens
        ), four.usage
        assert four.served_by == pb.LAYER_PREFIX_CACHE
    finally:
        again.stop()
