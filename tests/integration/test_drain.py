"""SIGTERM with answers in flight that outlast CACHEMESH_GRACE_S, on a whole supervised stack
(the simulator's answers slowed to about thirty seconds, a one-second grace).

The router: each stream is cut at the end of the grace; every model call it cut is billed,
once, for what it produced (prefix-cache's totals after the supervisor restarted the router and
its billing outbox, if any, was replayed). Before the fix most cut calls were never billed: the
drain closed the channels before the cancelled handlers had scheduled their bills.

SIGKILL with answers in flight (ROUTER_DATA_DIR set, as the stack sets it): no handler unwinds,
yet every model call the router had in flight is billed once, at its next start, from the open
calls it journalled (their prompts as their WARM commits priced them, and the output journalled
before the kill). Before the fix each such call was a WARM commit with no FINAL: its prompt and
output billed to nobody, while the provider was paid.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachemesh import CachemeshError, Client, build_request
from cachemesh.envfile import read_env_file
from services.router.open_calls import UPDATE_EVERY_S
from services.tools.stack.health import SERVING, probe
from services.tools.stack.lifecycle import Stack
from tests.integration.harness import pid_of, prefix_totals, started_stack

pytestmark = pytest.mark.integration

STREAMS = 8
TENANT = "tenant-a"


@pytest.fixture
def slow_stack(tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    """Answers of about thirty seconds (the shortest, 20 tokens, about nine), a grace of one:
    every stream is in flight when the router is signalled, whichever stream had its first
    delta first (at a third of this, on a loaded machine, the shortest answer now and then
    ended within the grace and the test's premise failed). One stack a test (about five
    seconds more than one for both): a test that fails midway leaves its streams in flight,
    or its router not yet back and its outbox not replayed, and the next test on the same
    stack counted what that one left (16 calls billed for its 8)."""
    run_dir = tmp_path / "run"
    extra = {"SIM_TIME_SCALE": "24", "CACHEMESH_GRACE_S": "1", "OTEL_TRACES_EXPORTER": "none"}
    with started_stack(run_dir, extra) as (stack, _sink):
        yield stack, run_dir


def _restarted(stack: Stack, run_dir: Path, router: int) -> None:
    """Waits until the supervisor has started the router again and its journal is empty (its
    billing outbox replayed at start)."""
    deadline = time.monotonic() + 60
    while pid_of(stack, "router") in (None, router) or probe(stack.router_address) != SERVING:
        assert time.monotonic() < deadline, "the router did not come back"
        time.sleep(0.1)
    outbox = run_dir / "data" / "router" / "billing-outbox.jsonl"
    while outbox.exists() and outbox.stat().st_size and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class Cut:
    """What ``_streams_cut`` saw: each stream's deltas and how it ended."""

    deltas: list[int]
    outcomes: list[str]


def _streams_cut(
    stack: Stack, run_dir: Path, what: str, deltas_first: int, sig: signal.Signals,
    after_s: float = 0.0,
) -> Cut:  # fmt: skip
    """``STREAMS`` answers streamed at once; once each has had ``deltas_first`` deltas (and
    ``after_s`` more), the router gets ``sig``; returns once every stream has ended."""
    keys = read_env_file(run_dir / "demo-keys.env")
    streaming = threading.Barrier(STREAMS + 1, timeout=60)
    cut = Cut([0] * STREAMS, [""] * STREAMS)

    def stream(i: int) -> None:
        question = f"{what} {i} {uuid.uuid4().hex}: explain the tides in depth"
        request = build_request(question, model="sim-large", max_tokens=2048)
        request.cache.namespace = uuid.uuid4().hex  # no L1 hit, no shared model call
        waited = False
        with Client(stack.router_address, api_key=keys["CACHEMESH_KEY_A"], max_attempts=1) as c:
            try:
                for chunk in c.stream(request):
                    if chunk.WhichOneof("part") == "delta":
                        cut.deltas[i] += 1
                        if cut.deltas[i] == deltas_first:
                            waited = True
                            streaming.wait()
                cut.outcomes[i] = "whole"
            except CachemeshError as error:
                cut.outcomes[i] = error.code.name
        if not waited:
            streaming.abort()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    try:
        streaming.wait()  # every stream is mid-answer
    except threading.BrokenBarrierError:
        raise AssertionError(f"not every answer lasted its deltas: {cut}") from None
    time.sleep(after_s)
    router = pid_of(stack, "router")
    assert router is not None
    os.kill(router, sig)
    for thread in threads:
        thread.join(timeout=60)
    assert "whole" not in cut.outcomes, cut  # the premise: the signal cut every answer
    _restarted(stack, run_dir, router)
    return cut


def test_router_sigterm_bills_every_call_it_cut(slow_stack: tuple[Stack, Path]) -> None:
    stack, run_dir = slow_stack
    token = (run_dir / "internal-token").read_text().strip()
    before = prefix_totals(stack.addresses["prefix-cache"], token, TENANT)
    # the supervisor starts the router again, which replays its journal if the drain left one
    cut = _streams_cut(stack, run_dir, "drain", 1, signal.SIGTERM)
    after = prefix_totals(stack.addresses["prefix-cache"], token, TENANT)
    billed = after.requests - before.requests
    assert billed == STREAMS, f"{STREAMS} calls cut, {billed} billed ({cut})"
    # each delta carried at least one token, each billed with the prompt
    assert after.usage.output_tokens - before.usage.output_tokens >= sum(cut.deltas)
    assert after.usage.input_tokens > before.usage.input_tokens
    # the callers got UNAVAILABLE; their access lines say so, not a caller's CANCELLED
    assert cut.outcomes == ["UNAVAILABLE"] * STREAMS, cut
    lines = [
        json.loads(line)
        for line in (run_dir / "logs" / "router.log").read_text().splitlines()
        if '"cachemesh.access"' in line
    ]
    statuses = [line["status"] for line in lines if line.get("method") == "StreamComplete"]
    assert statuses == ["UNAVAILABLE"] * STREAMS, statuses


# each stream has had this many deltas when the router is killed, a second and a half after
# (the open calls count their output once a second)
KILLED_AFTER_DELTAS = 1


def test_router_sigkill_bills_every_call_it_had_in_flight(
    slow_stack: tuple[Stack, Path],
) -> None:
    stack, run_dir = slow_stack
    token = (run_dir / "internal-token").read_text().strip()
    before = prefix_totals(stack.addresses["prefix-cache"], token, TENANT)
    # the open calls journal their output once a second: each counts it once before the kill
    cut = _streams_cut(
        stack, run_dir, "kill", KILLED_AFTER_DELTAS, signal.SIGKILL, UPDATE_EVERY_S + 0.5
    )
    after = prefix_totals(stack.addresses["prefix-cache"], token, TENANT)
    billed = after.requests - before.requests
    assert billed == STREAMS, f"{STREAMS} calls killed, {billed} billed ({cut})"
    assert after.usage.input_tokens > before.usage.input_tokens
    assert after.cost_nanos > before.cost_nanos
    # the output journalled before the kill: at least the first 2 chunks of each answer, a
    # token each at least
    assert after.usage.output_tokens - before.usage.output_tokens >= 2 * STREAMS
