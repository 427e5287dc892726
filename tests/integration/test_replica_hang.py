"""A hung model replica on real processes: its own supervised stack (sim-large served by
``model`` and ``model-2``), ``model-2`` stopped with SIGSTOP as a hung engine is. Requests with
a client deadline keep being answered by ``model``: a call to the hung replica that has no
first report far past its predicted prefill is abandoned (billed to no one: a simulated or
self-hosted engine bills nothing before its first token, and the router bills only from it)
and the request handed over, instead of waiting out the client's deadline until the replica
is ejected."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from cachemesh import CachemeshError, Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import prefix_totals, started_stack

pytestmark = pytest.mark.integration

DEADLINE_S = 5.0  # the client's: sooner than the router's ROUTER_MODEL_TIMEOUT_S
ASKED = 8


def _ask(client: Client, question: str) -> str:
    request = build_request(question, model="sim-large", max_tokens=16)
    request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
    try:
        client.complete(request)
    except CachemeshError as error:
        return error.code.name
    return "answered"


def test_a_hung_replicas_requests_are_handed_over_within_the_clients_deadline(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    with started_stack(run_dir, {"OTEL_TRACES_EXPORTER": "none"}) as (stack, _sink):
        keys = read_env_file(run_dir / "demo-keys.env")
        token = (run_dir / "internal-token").read_text().strip()
        pid = {r.service.name: r.pid for r in stack.running()}.get("model-2")
        assert pid is not None, "model-2 is not running"
        tag = uuid.uuid4().hex[:8]
        client = Client(
            stack.router_address,
            api_key=keys["CACHEMESH_KEY_A"],
            max_attempts=1,  # the router's own hand-over, not the client's retry
            timeout_s=DEADLINE_S,
        )
        with client:
            for i in range(4):  # both replicas answer: their prefill rates are measured
                assert _ask(client, f"{tag} warm-up {i}: how do I reset it?") == "answered"
            before = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
            os.kill(pid, signal.SIGSTOP)
            try:
                outcomes = [
                    _ask(client, f"{tag} question {i}: how do I reset it?") for i in range(ASKED)
                ]
            finally:
                os.kill(pid, signal.SIGCONT)
        print(f"\nwith model-2 hung: {outcomes}")
        assert outcomes == ["answered"] * ASKED  # was DEADLINE_EXCEEDED until it was ejected
        after = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
        assert after.requests - before.requests == ASKED  # each billed once: no abandoned call
