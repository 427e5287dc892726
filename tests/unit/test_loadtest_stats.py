"""The load test's aggregation: percentiles, per-layer figures, and the judging of L1 hits."""

from __future__ import annotations

from cachemesh.loadtest import report
from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.stats import percentile, summarise


def _ok(layer: str, latency: float, **fields: object) -> Sample:
    return Sample("faq", layer, "OK", 0.0, latency, None, **fields)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.5) == 0.0


def test_summary_splits_latency_cost_and_errors_by_layer() -> None:
    samples = [
        _ok("semantic_cache", 0.010, exact=True, cost_nanos=0, baseline_nanos=1000),
        _ok("model", 0.200, cost_nanos=300, baseline_nanos=900),
        _ok("prefix_cache", 0.100, cost_nanos=100, baseline_nanos=1000, cache_read_tokens=50),
        Sample("faq", "error", "UNAVAILABLE", 0.0, 0.05, None),
        _ok("model", 9.0, warmup=True, cost_nanos=10**9),  # warm-up: never counted
    ]
    results = summarise(samples, {}, wall_s=2.0)
    assert results["requests"] == 4 and results["completed"] == 3
    assert results["errors"] == {"UNAVAILABLE": 1}
    assert results["throughput_rps"] == 1.5
    assert results["served_by"] == {"semantic_cache": 1, "prefix_cache": 1, "model": 1}
    assert results["latency_ms"]["by_layer"]["semantic_cache"]["p50"] == 10.0
    assert results["latency_ms"]["all"]["max"] == 200.0
    cost = results["cost"]
    assert (cost["cost_nanos"], cost["baseline_nanos"], cost["saved_nanos"]) == (400, 2900, 2500)
    assert cost["by_layer"]["model"]["saved_nanos"] == 600
    assert results["hit_rate"]["semantic_cache_exact"] == round(1 / 3, 4)
    assert results["tokens"]["cache_read"] == 50
    assert results["labels"] is None


def test_wrong_l1_hits_are_judged_by_the_question_the_answer_was_made_for() -> None:
    a, b, c = "how do i learn python?", "how can i learn python?", "how do i learn java?"
    labels = {frozenset((a, b)): 1, frozenset((a, c)): 0}
    made = dict(layer="model", cost_nanos=100, baseline_nanos=100, answer_digest="d-a", question=a)
    samples = [
        _ok(latency=0.1, warmup=True, **made),  # type: ignore[arg-type]
        _ok("semantic_cache", 0.01, question=b, answer_digest="d-a", baseline_nanos=500),
        _ok("semantic_cache", 0.01, question=c, answer_digest="d-a", baseline_nanos=700),
        _ok("semantic_cache", 0.01, question=a, answer_digest="d-a", exact=True, baseline_nanos=9),
        _ok("semantic_cache", 0.01, question=c, answer_digest="d-zz", baseline_nanos=1),
    ]
    labels_out = summarise(samples, labels, wall_s=1.0)["labels"]
    assert labels_out["correct"] == 2
    assert labels_out["wrong"] == labels_out["wrong_labelled"] == 1
    assert labels_out["unknown_source"] == 1
    assert labels_out["wrong_saved_nanos"] == 700
    assert labels_out["saved_nanos_excluding_wrong"] == 500 + 9 + 1


def test_requests_that_ended_in_an_error_have_a_row_their_cost_unknown() -> None:
    """A run with 20 of 60 requests cut at their deadline showed "78.5% saved" on the 40 that
    completed: the 20 cut calls were billed for what their model produced (62% of the real
    spend), which the client never sees. The errors now have their row, their cost unknown,
    and the saving says it is the completed requests' only."""
    samples = [
        _ok("model", 0.2, cost_nanos=300, baseline_nanos=900),
        Sample("faq", "error", "DEADLINE_EXCEEDED", 0.0, 1.2, None),
        Sample("faq", "error", "DEADLINE_EXCEEDED", 0.0, 1.2, None),
    ]
    results = summarise(samples, {}, wall_s=2.0)
    assert results["cost"]["errored"] == {"requests": 2}
    assert results["cost"]["billed"] is None  # not read: no admin token given
    assert results["cost"]["cost_nanos"] == 300  # the completed requests' (the estimator's too)
    table = report.table(results)
    (row,) = [line for line in table.splitlines() if line.startswith("ended in error")]
    assert row.split()[3:5] == ["2", "unknown"]
    assert "saved on the completed requests only" in table
    clean = summarise(samples[:1], {}, wall_s=2.0)
    assert clean["cost"]["errored"] == {"requests": 0}
    assert "ended in error" not in report.table(clean)
    assert "only" not in report.table(clean)
