"""``cachemesh-load --duration`` on the session's stack: the requests in flight at the
duration's end finish within ``--stop-grace`` (answered, in the figures), none starts after it,
and the run of a healthy Gateway exits 0. Before: a ``--duration 0.3`` run of long sim-large
answers at 2 in flight had its 2 requests in flight cut, counted as errors
(``CUT_AT_DEADLINE: 2``), exit 1."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from cachemesh import build_request
from cachemesh.loadtest import cli
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A
from tests.integration.harness import RunningStack
from tests.unit.loadtest_cli import stack_config

pytestmark = pytest.mark.integration
DURATION_MS = 300.0


def test_the_requests_in_flight_at_the_durations_end_are_answered_within_the_grace(
    stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEMESH_API_KEY", stack.keys["tenant-a"])
    for name in ("CACHEMESH_ADMIN_TOKEN_FILE", "CACHEMESH_ADMIN_TOKEN", "CACHEMESH_KEY_B"):
        monkeypatch.delenv(name, raising=False)
    tag = uuid.uuid4().hex  # L1 misses: every answer is the model's (~0.1 s each here)
    plan = [
        Item("t", TENANT_A, build_request(f"Write a long essay on rivers {tag} {i}",
                                          model="sim-large", max_tokens=4000, namespace=tag))
        for i in range(40)
    ]  # fmt: skip
    monkeypatch.setattr(cli, "draw", lambda workload, count: plan[:count])
    out, log = tmp_path / "r.json", tmp_path / "log.jsonl"
    args = ["--target", stack.target, "--out", str(out), "--log-out", str(log),
            "--requests", str(len(plan)), "--concurrency", "2",
            "--duration", f"{DURATION_MS / 1000:g}", "--stop-grace", "60",
            "--stack-config", str(stack_config(tmp_path))]  # fmt: skip
    code = cli.main(args)
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert code == 0, (results["errors"], doc["warnings"])
    assert results["errors"] == {} and results["cut_at_deadline"] == 0
    assert 0 < results["completed"] == results["requests"] < len(plan)  # the duration bound
    # by order against the duration's end (the run began at or before the first send, so a
    # time past DURATION_MS from it is past the deadline; one before it may be either side):
    # none was sent after the end, and one at least ran past it and was answered
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r["code"] == "OK" for r in records)
    assert all(r["t_ms"] < DURATION_MS for r in records), [r["t_ms"] for r in records]
    assert any(r["t_ms"] + r["latency_ms"] > DURATION_MS for r in records)
