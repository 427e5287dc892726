"""A hung prefix-cache on real processes: its own supervised stack, prefix-cache stopped with
SIGSTOP (as a hung process, or one waiting on a stopped Redis, answers nothing until each call's
deadline). Requests with a 3 s client deadline are answered, priced by estimate, as when it is
down: Plan, WARM and FINAL waited 2 s each (ROUTER_PREFIX_TIMEOUT_S) whatever the deadline
left, and the requests ended DEADLINE_EXCEEDED though the model answered. Their bills wait in
the router's outbox and reach prefix-cache once it runs again, each once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from cachemesh import CachemeshError, Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import prefix_totals, started_stack, stoppable

pytestmark = pytest.mark.integration

DEADLINE_S = 3.0  # the client's: shorter than Plan + WARM at ROUTER_PREFIX_TIMEOUT_S (2 s)
ASKED = 5


def _ask(client: Client, question: str) -> str:
    request = build_request(question, model="sim-large", max_tokens=16)
    request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
    try:
        end = client.complete(request)
    except CachemeshError as error:
        return error.code.name
    return "estimated" if end.cost.estimated else "billed"


def test_a_hung_prefix_cache_degrades_requests_within_the_clients_deadline(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    with started_stack(run_dir, {"OTEL_TRACES_EXPORTER": "none"}) as (stack, _sink):
        stopped = stoppable(stack, run_dir, "prefix-cache", DEADLINE_S)
        client, token = stopped.client, stopped.token
        address = stack.addresses["prefix-cache"]
        tag = uuid.uuid4().hex[:8]
        with client:
            assert _ask(client, f"{tag} warm-up: how do I reset it?") == "billed"
            before = prefix_totals(address, token, "tenant-a")
            outcomes = stopped.while_hung(
                lambda: [
                    _ask(client, f"{tag} question {i}: how do I reset it?") for i in range(ASKED)
                ]
            )
        print(f"\nwith prefix-cache hung: {outcomes}")
        assert outcomes == ["estimated"] * ASKED  # was DEADLINE_EXCEEDED
        # the outbox replays every ROUTER_OUTBOX_RETRY_S (1 s): each answer billed, once
        waited_until = time.monotonic() + 60
        while (grown := prefix_totals(address, token, "tenant-a").requests - before.requests) < (
            ASKED
        ) and time.monotonic() < waited_until:
            time.sleep(0.5)
        assert grown == ASKED
