"""``make bench`` fails (exit 1, the points named) when a measured point had requests that
ended in an error, instead of writing their 0.0 req/s as the case's figure and exiting 0; the
report is still written, and lists them (``failed_points``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.tools.bench.gateway import output, summary
from services.tools.bench.gateway.http_path import CASE as HTTP_CASE
from services.tools.bench.gateway.ratios import case_ratios
from services.tools.bench.gateway.run import publish
from services.tools.bench.gateway.runs import AGENT, EXACT, MIXED
from tests.unit.test_bench_ratios import _results


def _http(errors: int) -> dict[str, Any]:
    def path(errs: int) -> dict[str, Any]:
        return {"completed": 10, "errors": errs, "wrong_layer": 0, "throughput_rps": 5.0,
                "latency_ms": {"p50": 1.0, "p99": 2.0}}  # fmt: skip

    row = {"concurrency": 8, "grpc": path(0), "http": path(errors), "http_to_grpc_rps": 1.0}
    return {"stack": "http", "overrides": [], "exact_hits": [row], "misses": []}


def _doc(results: dict[str, Any]) -> dict[str, Any]:
    return output.document(
        run={"elapsed_s": 1.0}, workload={}, stack={}, stacks={}, results=results,
        ratios=case_ratios(results),
    )  # fmt: skip


def test_no_failed_point_when_every_request_completed() -> None:
    results = _results()
    results["cases"][HTTP_CASE] = _http(0)
    assert summary.failed_points(results) == []


def test_every_point_with_errors_is_named_with_its_codes() -> None:
    results = _results()
    results["cases"][EXACT][1]["errors"] = {"UNAUTHENTICATED": 6}
    results["tracing"]["on"][AGENT][2]["errors"] = {"DEADLINE_EXCEEDED": 1}
    results["cases"][MIXED]["errors"] = {"UNAVAILABLE": 3}
    results["cases"][HTTP_CASE] = _http(2)
    assert summary.failed_points(results) == [
        "(a) exact L1 hits x8: errors {'UNAUTHENTICATED': 6}",
        "(c) agent misses, sim 0, traced, x32: errors {'DEADLINE_EXCEEDED': 1}",
        "(d) mixed x8: errors {'UNAVAILABLE': 3}",
        "(e) exact_hits http x8: 2 errors",
    ]


def test_a_point_whose_run_was_cut_at_its_bound_is_named() -> None:
    """The load test counts a request cut at the run's end apart from its errors: a bench run
    that reached its bound (which a working stack never does) must still be named."""
    results = _results()
    results["cases"][EXACT][1]["cut_at_deadline"] = 2
    results["cases"][MIXED]["errors"] = {"UNAVAILABLE": 3}
    results["cases"][MIXED]["cut_at_deadline"] = 1
    assert summary.failed_points(results) == [
        "(a) exact L1 hits x8: 2 cut at the run's bound",
        "(d) mixed x8: errors {'UNAVAILABLE': 3}; 1 cut at the run's bound",
    ]


def test_a_point_with_errors_fails_the_bench_and_the_report_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a --target bench whose key the stack refused (every request UNAUTHENTICATED)
    printed 0.0 req/s and ratio 0.000 for every point, wrote the report and exited 0."""
    results = _results()
    results["cases"][EXACT][0]["errors"] = {"UNAUTHENTICATED": 6}
    with pytest.raises(SystemExit) as exited:
        publish(_doc(results), [], tmp_path, "2026-12-06T000000Z")
    said = str(exited.value.code)
    assert said.startswith("bench: 1 measured point(s) had requests that ended in an error")
    assert "(a) exact L1 hits x1: errors {'UNAUTHENTICATED': 6}" in said
    written = json.loads((tmp_path / "bench-2026-12-06T000000Z.json").read_text())
    assert written["failed_points"] == ["(a) exact L1 hits x1: errors {'UNAUTHENTICATED': 6}"]
    assert "errors {'UNAUTHENTICATED': 6}" in capsys.readouterr().out  # the table too


def test_a_clean_run_writes_its_report_and_returns(tmp_path: Path) -> None:
    out = publish(_doc(_results()), [], tmp_path, "2026-12-06T000000Z")
    assert json.loads(out.read_text())["failed_points"] == []
    assert out.with_suffix(".html").is_file()
