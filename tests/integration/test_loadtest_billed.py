"""cachemesh-load's billed spend on the session's stack: the router's Admin GetStats, read
before and after, counts a request that ended without a response (cut after its first token,
as a deadline cuts it), whose bill no response told the client. A 60-request run at
``--timeout 1.2`` reported $0.0468 and 78.5% saved: the stack had billed $0.1229."""

from __future__ import annotations

import time
import uuid

import pytest

from cachemesh import Client, build_request
from cachemesh.loadtest import billed
from cachemesh.loadtest.load import run_load
from cachemesh.loadtest.runner import LoadShape
from cachemesh.loadtest.samples import from_error
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration


def _billed_everyone(stack: RunningStack) -> int:
    """prefix-cache's totals, asked of it directly (the internal credential), every tenant."""
    return sum(stack.totals(tenant).cost_nanos for tenant in stack.keys)


def test_the_billed_spend_counts_the_requests_that_ended_in_an_error(
    client_a: Client, stack: RunningStack
) -> None:
    token = (stack.stack.run_dir / "admin-token").read_text().strip()
    read = billed.StackTotals(stack.target, token)
    before, quiet = billed.settled(read)
    assert quiet
    direct_before = _billed_everyone(stack)
    tag = uuid.uuid4().hex
    answered = Item("t", TENANT_A, build_request(f"Where is gate B12? {tag}", model="sim-small",
                                                 max_tokens=64, namespace=tag))  # fmt: skip
    shape = LoadShape("closed", 1, 0.0, 60.0, False, 30.0, 7)
    samples = run_load(stack.target, {TENANT_A: stack.keys["tenant-a"]}, [], [answered], shape)
    assert [s.code for s in samples] == ["OK"] and samples[0].cost_nanos > 0
    # the second request is cut once its model call has sent a token: billed, no response
    cut = build_request(f"Write a long essay on rivers {tag}", model="sim-large",
                        max_tokens=4000, namespace=tag)  # fmt: skip
    began = time.monotonic()
    with client_a.stream(cut) as chunks:
        for chunk in chunks:
            if chunk.WhichOneof("part") == "delta":
                break
    samples.append(from_error(Item("t", TENANT_A, cut), "DEADLINE_EXCEEDED", began, 0.0, index=1))
    after, quiet = billed.settled(read)
    assert quiet
    figures = billed.figures(before, after, samples)
    assert figures["cost_nanos"] == _billed_everyone(stack) - direct_before
    assert figures["model_requests"] == 2
    assert figures["errored_cost_nanos"] == figures["cost_nanos"] - samples[0].cost_nanos > 0
