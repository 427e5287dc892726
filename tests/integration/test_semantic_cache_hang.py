"""A hung semantic-cache on real processes: its own supervised stack, semantic-cache stopped with
SIGSTOP (as a stuck loop or a host under swap answers nothing until each call's deadline).
Every request paid its whole Lookup deadline (ROUTER_SEMANTIC_TIMEOUT_S, 2 s by default)
before the model answered, for as long as L1 stayed hung. Now, after 3 Lookups in a row timed
out, the router sends none for ROUTER_SEMANTIC_BREAKER_S: the model answers, and the request's trace
shows the Lookup skipped (a degradation saying why, no Lookup span), not timed out.

Nothing is timed: the trace's spans and the router's counters tell which Lookups were sent."""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.router.calls import L1_LEFT_ALONE
from services.tools.stack.otlp_sink import OtlpSink, Span
from tests.integration.harness import started_stack, stoppable

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0  # the client's: each Lookup gets the whole ROUTER_SEMANTIC_TIMEOUT_S
# Short, so that the timeouts and the skips all come within 5 s of the stop: the router's
# channel pings an idle peer every 10 s and gives it up 5 s after an unanswered ping
# (services/common/channels.py), after which Lookups fail at once (UNAVAILABLE, which never
# counts toward the breaker) instead of timing out; at 2 s each, a ping soon after the stop
# turned the third Lookup into an UNAVAILABLE on a loaded machine.
LOOKUP_TIMEOUT_S = 0.75
TIMED_OUT = 3  # breaker.BREAKER_AFTER: the Lookups that time out before L1 is left alone
SKIPPED = 3  # the requests after them
DEADLINE_EXCEEDED = 4  # rpc.grpc.status_code
SPAN_KIND_CLIENT = 3  # OTLP's
L1 = "semantic-cache"


def _ask(client: Client, question: str) -> pb.CompleteResponse:
    return client.complete(build_request(question, model="sim-large", max_tokens=16))


def _router_spans(sink: OtlpSink, trace_id: str) -> list[Span]:
    """The router's spans of the trace, once its root and model-call spans are exported."""
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in sink.spans_of(trace_id) if s.service == "router"]
        if any(not s.parent_span_id for s in spans) and any(
            s.name.startswith("chat ") for s in spans
        ):
            return spans
        assert time.monotonic() < deadline, f"router spans not exported: {spans}"
        time.sleep(0.2)


def _l1(spans: list[Span]) -> tuple[list[int], list[str]]:
    """The trace's Lookups (each one's gRPC status code) and why its L1 calls were skipped (a
    Lookup's or a Store's: its Store's is on a span of its own, maybe not exported yet)."""
    sent = [
        int(s.attributes["rpc.grpc.status_code"])
        for s in spans
        if s.attributes.get("rpc.method") == "Lookup" and s.kind == SPAN_KIND_CLIENT
    ]
    skipped = [
        str(attributes["cachemesh.skipped"])
        for s in spans
        for name, attributes in s.events
        if name == "cachemesh.degraded"
        and attributes.get("dependency") == L1
        and "cachemesh.skipped" in attributes
    ]
    return sent, skipped


def _router_lookups(address: str) -> dict[str, float]:
    """The router's Lookups by status, and its semantic-cache degradations by reason."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            name = sample.name
            if name.startswith("cachemesh_router_dependency") and name.endswith("_count"):
                if labels.get("method") == "Lookup":
                    found[f"Lookup {labels['code']}"] = sample.value
            elif name == "cachemesh_router_degraded_total" and labels["dependency"] == L1:
                found[f"degraded {labels['reason']}"] = sample.value
    return found


def test_a_hung_semantic_cache_is_left_alone_after_lookups_timed_out(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # open longer than the test: no request tries L1 again while it is stopped
    settings = {
        "ROUTER_SEMANTIC_BREAKER_S": "600",
        "ROUTER_SEMANTIC_TIMEOUT_S": str(LOOKUP_TIMEOUT_S),
    }
    with started_stack(run_dir, settings) as (stack, sink):
        stopped = stoppable(stack, run_dir, "semantic-cache", DEADLINE_S)
        metrics = stack.metrics_addresses["router"]
        tag = uuid.uuid4().hex[:8]
        with stopped.client as client:
            warm_up = _ask(client, f"{tag} warm-up: how do I reset it?")
            assert warm_up.served_by == pb.LAYER_MODEL  # L1 answered: a miss
            before = _router_lookups(metrics)
            answers = stopped.while_hung(
                lambda: [
                    _ask(client, f"{tag} question {i}: how do I reset it?")
                    for i in range(TIMED_OUT + SKIPPED)
                ]
            )
        assert [a.served_by for a in answers] == [pb.LAYER_MODEL] * (TIMED_OUT + SKIPPED)
        assert all(a.content and a.content[0].text for a in answers)
        seen = [_l1(_router_spans(sink, a.trace_id)) for a in answers]
        print(f"\nLookups (status codes) and skips with semantic-cache hung: {seen}")
        # the first requests' Lookups timed out ...
        for sent, skipped in seen[:TIMED_OUT]:
            assert sent == [DEADLINE_EXCEEDED] and L1_LEFT_ALONE not in skipped
        # ... and the next ones sent none: skipped, saying why
        for sent, skipped in seen[TIMED_OUT:]:
            assert sent == [] and L1_LEFT_ALONE in skipped
        after = _router_lookups(metrics)
        grown = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
        print(f"router counters grown: {grown}")
        assert grown.get("Lookup DEADLINE_EXCEEDED") == TIMED_OUT  # no Lookup sent after those
        assert "Lookup OK" not in grown
        # each request is still a degradation: timed out, or skipped
        assert grown.get("degraded DEADLINE_EXCEEDED", 0) >= TIMED_OUT + SKIPPED
