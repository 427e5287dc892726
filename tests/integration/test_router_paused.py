"""The router's own pause on real processes: sim-large on ``model`` and ``model-2``, the silence
allowed mid-answer shortened (``ROUTER_MID_ANSWER_STALL_S`` 0.5: at SIM_TIME_SCALE 0.5, 50 chunk
gaps, about 1.5 s), eight Complete calls with long answers, and the router stopped with SIGSTOP
for ``PAUSE_S`` once they have their first token. The replicas answer meanwhile; at SIGCONT the
router's overdue silence timers ran before gRPC handed the chunks over, and cut healthy calls as
hung (counted against their replica, handed over, billed twice). Now each call is answered and
billed once (before: 14 model calls for the 8, six cut "silent mid-answer for 4.0 s")."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.harness import pid_of, prefix_totals, started_stack, stoppable
from tests.integration.test_replica_hang import (
    ASKED,
    PAUSE_S,
    _complete,
    _long_questions,
    _model_metrics,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0
BILLED_WITHIN_S = 15.0  # the router's outbox sends its bills to prefix-cache after the answer


def _billed(address: str, token: str, before: int) -> int:
    """Tenant a's requests billed since ``before``, once at least ``ASKED`` are."""
    waited = time.monotonic() + BILLED_WITHIN_S
    while True:
        billed = prefix_totals(address, token, "tenant-a").requests - before
        if billed >= ASKED or time.monotonic() > waited:
            return billed
        time.sleep(0.1)  # the next look


def test_a_router_stopped_mid_answer_cuts_no_healthy_call(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = {
        "OTEL_TRACES_EXPORTER": "none",
        "SIM_TIME_SCALE": "0.5",
        "SIM_SPECULATIVE": "false",
        "ROUTER_REPLICA_POLICY": "round_robin",
        "ROUTER_MID_ANSWER_STALL_S": "0.5",
    }
    with started_stack(run_dir, extra) as (stack, _sink):
        stopped = stoppable(stack, run_dir, "model", DEADLINE_S)
        client, token = stopped.client, stopped.token
        router = pid_of(stack, "router")
        assert router is not None
        metrics = [stack.metrics_addresses[name] for name in ("model", "model-2")]
        first_tokens = "cachemesh_model_time_to_first_token_seconds_count"
        tag = uuid.uuid4().hex[:8]
        with client, ThreadPoolExecutor(ASKED) as pool:
            long = _long_questions(client, pool, tag, ASKED)
            before = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
            started = sum(_model_metrics(m).get(first_tokens, 0.0) for m in metrics)
            calls = [pool.submit(_complete, client, question) for question in long[:ASKED]]
            try:
                waited = time.monotonic() + 10
                while True:  # the calls have their first token and decode
                    now = [_model_metrics(m) for m in metrics]
                    if sum(n.get(first_tokens, 0.0) for n in now) - started >= ASKED // 2:
                        in_flight = sum(n.get("cachemesh_model_in_flight", 0.0) for n in now)
                        break
                    assert time.monotonic() < waited, "the replicas were not given the calls"
                    time.sleep(0.02)  # the next look
                os.kill(router, signal.SIGSTOP)
                time.sleep(PAUSE_S)  # the router's pause: the replicas answer meanwhile
            finally:
                os.kill(router, signal.SIGCONT)
            outcomes = [call.result() for call in calls]
        codes = [a if isinstance(a, str) else "answered" for a in outcomes]
        # each call made once on the replicas: a cut call is run again on the other
        made = sum(_model_metrics(m).get(first_tokens, 0.0) for m in metrics) - started
        billed = _billed(stack.addresses["prefix-cache"], token, before.requests)
        print(f"\nrouter stopped {PAUSE_S} s, {in_flight:.0f} decoding: {codes}, {made:.0f} made")
        assert in_flight >= 1, "the replicas had ended their answers before the router stopped"
        assert codes == ["answered"] * ASKED
        assert made == ASKED
        assert billed == ASKED  # no call cut (a cut call is billed on its own, then run again)
