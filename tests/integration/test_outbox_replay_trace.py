"""A bill replayed after a prefix-cache restart, on real processes: its own supervised stack,
traces exported to a sink in this process. prefix-cache is held stopped, a request is answered
(priced by estimate, its bill kept in the router's outbox), and prefix-cache started again:
the replay that bills it is in the request's trace, its WARM and FINAL Commit calls in the
router and in prefix-cache; the rounds while prefix-cache was down add no span but the first
try's. Before, every try after that first one was sent unsampled, the one that billed too:
prefix-cache recorded no Commit span for the bill, and logged it under a span id no exported
span has."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest

from cachemesh import Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.stack.otlp_sink import OtlpSink, Span
from services.tools.stack.supervisor import HELD_DIR
from tests.integration.harness import prefix_totals, started_stack

pytestmark = pytest.mark.integration

REPLAY = "cachemesh.billing_replay"


def _replays(sink: OtlpSink, trace_id: str) -> list[Span]:
    return [s for s in sink.spans_of(trace_id) if s.service == "router" and s.name == REPLAY]


def _billed(address: str, token: str) -> int:
    """tenant-a's billed requests; 0 while prefix-cache does not answer (starting again)."""
    try:
        return prefix_totals(address, token, "tenant-a").requests
    except grpc.RpcError:
        return 0


def _settled_with_commits(sink: OtlpSink, trace_id: str) -> bool:
    spans = sink.spans_of(trace_id)
    settled = {s.span_id for s in spans if s.name == REPLAY and _outcome(s) == "settled"}
    calls = {s.span_id for s in spans if s.parent_span_id in settled}
    return len([s for s in spans if s.service == "prefix-cache" and s.parent_span_id in calls]) >= 2


def _outcome(span: Span) -> object:
    return span.attributes.get("cachemesh.outcome")


def test_the_replay_that_bills_after_a_prefix_cache_restart_is_in_the_requests_trace(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    # a replay round every 0.2 s: many rounds while prefix-cache is down and starts again
    with started_stack(run_dir, {"ROUTER_OUTBOX_RETRY_S": "0.2"}) as (stack, sink):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        token = (run_dir / "internal-token").read_text().strip()
        address = stack.addresses["prefix-cache"]
        stack.stop_service("prefix-cache", timeout_s=30)
        request = build_request(f"{uuid.uuid4().hex[:8]}: how do I reset it?", max_tokens=16)
        request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
        with Client(stack.router_address, api_key=key, max_attempts=1, timeout_s=30) as client:
            answer = client.complete(request)
        assert answer.cost.estimated  # its bill waits in the outbox
        trace_id = answer.trace_id
        deadline = time.monotonic() + 20
        while not _replays(sink, trace_id):  # the first try, unreachable, is recorded
            assert time.monotonic() < deadline, "no replay span for the first try"
            time.sleep(0.1)
        (run_dir / HELD_DIR / "prefix-cache").unlink()  # the supervisor starts it again
        deadline = time.monotonic() + 90
        while _billed(address, token) < 1:
            assert time.monotonic() < deadline, "the kept bill was not replayed"
            time.sleep(0.2)
        deadline = time.monotonic() + 20
        while not _settled_with_commits(sink, trace_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        spans = sink.spans_of(trace_id)
        replays = _replays(sink, trace_id)
        billed = prefix_totals(address, token, "tenant-a")  # this stack's one request
    assert [_outcome(r) for r in replays] == ["unreachable", "settled"], replays
    settled = replays[1]
    rounds = settled.attributes["cachemesh.unreachable_rounds"]
    assert isinstance(rounds, int) and rounds >= 1  # tries went out while it was down
    calls = [s for s in spans if s.parent_span_id == settled.span_id]
    assert [(c.service, c.name.rpartition("/")[2]) for c in calls] == [("router", "Commit")] * 2
    served = [s for s in spans if s.parent_span_id in {c.span_id for c in calls}]
    assert (
        sorted((s.service, s.name.rpartition("/")[2]) for s in served)
        == [("prefix-cache", "Commit")] * 2
    ), [(s.service, s.name) for s in spans]
    # the bill made of the estimate the answer carried: on the replay span, and said once
    assert billed.requests == 1
    assert settled.attributes["cachemesh.cost_nanos"] == billed.cost_nanos
    assert settled.attributes["cachemesh.estimate_nanos"] == answer.cost.cost_nanos
    assert settled.attributes["cachemesh.billed_layer"] in ("LAYER_MODEL", "LAYER_PREFIX_CACHE")
    said = [
        line
        for line in (run_dir / "logs" / "router.log").read_text().splitlines()
        if "replayed the bill of" in line and answer.request_id in line
    ]
    assert len(said) == 1, said
    assert f"estimated cost_nanos={answer.cost.cost_nanos}" in said[0]
    assert f"billed cost_nanos={billed.cost_nanos}" in said[0]
    print(
        f"\n{rounds} rounds down: {len(replays)} replay spans, the bill's WARM and FINAL traced;"
        f" estimated {answer.cost.cost_nanos}, billed {billed.cost_nanos} nanos"
        f" ({settled.attributes['cachemesh.billed_layer']})"
    )
