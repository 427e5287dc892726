"""bench-router's replay: a figure of the router's policy, not of the machine's load. Each
Lookup's embedding (what ``auto`` is scored on) is made whatever real time it takes: a replay
that kept the router's real-time ``ROUTER_SEMANTIC_TIMEOUT_S`` scored a request whose Lookup
missed it (a loaded machine) on its shape alone: a point of the mix's sweep read a loss of
24.93 in one run, 24.819 in the others."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cachemesh.loadtest.reqlog import LogRecord
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A, user
from cachemesh.v1 import gateway_pb2 as pb
from services.common.tokens import load_cl100k
from services.router.routing.model import load_router_model
from services.semantic_cache.cross_encoder import load_cross_encoder
from services.semantic_cache.embedder import load_minilm_embedder
from services.tools.bench.router import __main__ as bench_router
from services.tools.bench.router.frontier import Served
from services.tools.bench.router.replay import Shared, run
from services.tools.stack.lifecycle import Stack
from tests.public_data import data_dir

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = (
    "What is the capital of France?",
    "Prove that there are infinitely many primes, then generalise the argument to primes "
    "of the form 4k+3.",
    "Write a Python function that merges two sorted lists in linear time.",
)


@pytest.fixture(scope="module")
def shared() -> Shared:
    return Shared(load_minilm_embedder(threads=1), load_cl100k(), load_cross_encoder(threads=1))


def _records() -> list[LogRecord]:
    return [
        LogRecord(
            i * 2000.0, Item("t", TENANT_A, pb.CompleteRequest(max_tokens=200, messages=[user(q)]))
        )
        for i, q in enumerate(QUESTIONS)
    ]


def _replay(shared: Shared, **over: str) -> list[Served]:
    settings = {**Stack(ROOT, environ={}).settings(), **over}
    return asyncio.run(run(settings, _records(), "auto", shared))


def test_each_request_is_scored_on_its_embedding_however_short_the_lookup_bound(
    shared: Shared,
) -> None:
    # 0.001 s, the least the setting takes: no time at all to embed in once L1's reply
    # margin is taken (the replay kept it: every request scored on its shape alone)
    served = _replay(shared, ROUTER_SEMANTIC_TIMEOUT_S="0.001")
    model = load_router_model()
    expected = [model.score(q, shared.embedder.embed([q])[0]) for q in QUESTIONS]
    shape_only = [model.score(q, None) for q in QUESTIONS]
    assert all(s.tier for s in served)
    scores = [s.score for s in served]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert scores != pytest.approx(shape_only, abs=1e-6)  # the two tell apart here
    # and the same tiers, scores and bills as under the router's default bound
    assert served == _replay(shared)


def test_the_report_says_what_expected_loss_is_once_at_its_top(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--workloads", "tools", "mix", "--requests", "2", "--sweep", "none"]
    assert bench_router.main([*argv, "--data", str(data_dir()), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    report = json.loads(text)
    assert report["expected_loss"] == bench_router.LOSS_MEANS
    assert text.count(json.dumps(bench_router.LOSS_MEANS)) == 1  # not once a workload
    workloads = report["workloads"]
    assert list(workloads) == ["tools", "mix"]
    for body in workloads.values():  # each workload's rows, under the keys they had
        assert set(body) == {
            "policies",
            "against_plain_frontier",
            "plain_frontier",
            "cost_aware_sweep",
        }
        assert set(body["policies"]) == set(bench_router.POLICIES)
