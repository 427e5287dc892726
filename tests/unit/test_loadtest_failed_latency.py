"""cachemesh-load's latency left out every request that failed: 55 DEADLINE_EXCEEDED of 60
(--timeout) and the table showed `all n=5`. The failed ones have their own figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cachemesh.loadtest import cli, report
from cachemesh.loadtest.samples import CUT, Sample
from cachemesh.loadtest.stats import summarise
from tests.unit.loadtest_cli import cli_env, run_cli  # noqa: F401 (cli_env: a fixture)

pytestmark = pytest.mark.usefixtures("cli_env")


def test_failed_requests_have_their_own_latency_figures_and_table_line() -> None:
    """55 DEADLINE_EXCEEDED of 60 (--timeout 2): the table said `all n=5`, a slow tail gone."""
    done = [Sample("q", "model", "OK", 0.0, 0.5, None) for _ in range(5)]
    failed = [Sample("q", "error", "DEADLINE_EXCEEDED", 0.0, 2.0, None) for _ in range(55)]
    cut = [Sample("q", "error", CUT, 0.0, 3.0, None) for _ in range(2)]
    results = summarise([*done, *failed, *cut], {})
    assert results["latency_ms"]["all"]["n"] == 5  # the completed ones', as before
    assert results["failed_ms"]["all"]["n"] == 55 and results["failed_ms"]["all"]["max"] == 2000.0
    assert results["failed_ms"]["by_code"]["DEADLINE_EXCEEDED"]["p50"] == 2000.0
    assert results["cut_at_deadline_ms"]["n"] == 2
    assert summarise(done, {})["failed_ms"] is None
    table = report.table(results)
    assert any(line.startswith("failed") and " 55 " in line for line in table.splitlines()), table
    assert any(line.startswith("cut at deadline") for line in table.splitlines()), table


def test_the_failed_latency_is_written_to_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(target: str, keys: object, warmup: list[Any], plan: list[Any], *_: object,
             **__: object) -> list[Sample]:  # fmt: skip
        return [Sample("q", "model", "OK", 0.0, 0.1, None, index=0)] + [
            Sample("q", "error", "DEADLINE_EXCEEDED", 0.0, 2.0, None, index=i)
            for i in range(1, len(plan))
        ]

    monkeypatch.setattr(cli, "run_load", slow)
    assert run_cli(tmp_path) == 1
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results["failed_ms"]["all"] == {**results["failed_ms"]["all"], "n": 1, "max": 2000.0}
