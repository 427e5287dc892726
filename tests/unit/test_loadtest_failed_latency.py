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


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEMESH_API_KEY", "k")
    monkeypatch.setenv("CACHEMESH_KEY_B", "k2")
    for name in ("CACHEMESH_ADMIN_TOKEN_FILE", "CACHEMESH_ADMIN_TOKEN", "CACHEMESH_TLS",
                 "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE", "CACHEMESH_KEY_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "check_gateway", lambda target, tls=None: None)


def _run(tmp_path: Path, *extra: str, target: str = "127.0.0.1:1") -> int:
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--requests", "2"]
    return cli.main([*args, "--stack-config", str(tmp_path / "none.env"), *extra])


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
    assert _run(tmp_path) == 1
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results["failed_ms"]["all"] == {**results["failed_ms"]["all"], "n": 1, "max": 2000.0}
