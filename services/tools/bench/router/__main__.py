"""``python -m services.tools.bench.router``: the cost-aware learned router against the plain
learned router (no prefix-cache weighing) and always-large, on the estimator's agent
(tau-bench), tools (BFCL) and mixed workloads, L1 bypassed (the router alone is measured).

Each policy is reported in dollars and in expected quality loss (``frontier``: the sum of the
learned scores of the requests sent to the small tier, against always-large: net, so below 0
when the requests sent small are ones the small model is predicted to answer better; each row
says that part, ``expected_gain``). The plain router is also swept over
thresholds, tracing its cost for each expected loss, so each policy's dollars can be read
against what the plain router pays for the same expected loss. Writes
bench-results/router-replay.json: ``expected_loss``, what a row's expected loss is (said once),
and ``workloads``, each workload's rows by name (``policies``, ``against_plain_frontier``,
``plain_frontier``, ``cost_aware_sweep``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from cachemesh._argv import Parser
from cachemesh.loadtest.workloads import NAMES
from services.common.tokens import load_cl100k, tokenizer_error_exits
from services.semantic_cache.cross_encoder import load_cross_encoder
from services.semantic_cache.embedder import load_minilm_embedder
from services.tools.arg_checks import at_least
from services.tools.bench.router.frontier import (
    Point,
    Served,
    cost_at_loss,
    loss_at_cost,
    point,
    sweep_thresholds,
)
from services.tools.bench.router.replay import Shared, records, run
from services.tools.out_path import refuse_unwritable
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[4]
PLAIN = {"ROUTER_COST_AWARE": "false"}
COST_AWARE = {"ROUTER_COST_AWARE": "true"}
# name -> (model, settings over the stack's): each named explicitly, whatever the defaults
POLICIES: dict[str, tuple[str, dict[str, str]]] = {
    "cost_aware": ("auto", COST_AWARE),
    "cost_aware_amortized": ("auto", {**COST_AWARE, "ROUTER_WRITE_AMORTIZE_TURNS": "4"}),
    "plain_learned": ("auto", PLAIN),
    "always_large": ("sim-large", {}),
}
SWEEP_SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
# what a row's expected_loss is: said once, at the top of the report (not in each workload)
LOSS_MEANS = (
    "net expected correctness given up against always-large: the sum of the learned scores "
    "(P(large right) - P(small right)) of the requests sent to the small tier; below 0 when "
    "those are requests the small model is predicted to answer better (expected_gain: minus "
    "the sum of the negative ones, small_predicted_better: how many)"
)


class Bench:
    def __init__(self, args: argparse.Namespace, shared: Shared) -> None:
        self.args = args
        self.shared = shared

    def replay(self, workload: str, model: str, over: dict[str, str]) -> list[Served]:
        settings = Stack(ROOT, env_overrides=over).settings()
        logged = records(workload, self.args.requests, self.args.interval_ms, self.args.data)
        return asyncio.run(run(settings, logged, model, self.shared))

    def workload(self, workload: str) -> dict[str, object]:
        points: dict[str, Point] = {}
        scores: list[float] = []
        for name, (model, over) in POLICIES.items():
            served = self.replay(workload, model, over)
            points[name] = point(name, None, served, "small")
            if name == "plain_learned":
                scores = [s.score for s in served if s.score is not None]
            print(workload, name, points[name].row(), flush=True)
        thresholds = (
            sweep_thresholds(np.array(scores), SWEEP_SHARES) if self.args.sweep != "none" else []
        )
        plain = [points["plain_learned"], points["always_large"]]
        swept = []
        for t in thresholds:
            over = {**PLAIN, "ROUTER_THRESHOLD": str(t)}
            plain.append(point(f"plain@{t}", t, self.replay(workload, "auto", over), "small"))
            print(workload, "plain sweep", plain[-1].row(), flush=True)
            if self.args.sweep == "both":
                over = {**COST_AWARE, "ROUTER_THRESHOLD": str(t)}
                swept.append(
                    point(f"cost_aware@{t}", t, self.replay(workload, "auto", over), "small")
                )
                print(workload, "cost-aware sweep", swept[-1].row(), flush=True)
        swept_plain = bool(thresholds)  # no sweep: no frontier to read against (n/a)
        against = {
            name: {
                "cost_usd": p.cost_usd,
                "expected_loss": p.expected_loss,
                "plain_cost_at_this_loss": (
                    cost_at_loss(plain, p.expected_loss) if swept_plain else None
                ),
                "plain_loss_at_this_cost": loss_at_cost(plain, p.cost_usd) if swept_plain else None,
            }
            for name, p in points.items()
        }
        return {
            "policies": {name: p.row() for name, p in points.items()},
            "against_plain_frontier": against,
            "plain_frontier": [p.row() for p in sorted(plain, key=lambda p: p.expected_loss)],
            "cost_aware_sweep": [p.row() for p in swept],
        }


def _table(workloads: dict[str, dict[str, object]]) -> str:
    lines = [
        "| workload | policy | cost (USD) | large share | net expected loss vs always-large "
        "(per request) | plain router's cost at that loss |",
        "|---|---|---|---|---|---|",
    ]
    for workload, body in workloads.items():
        policies = body["policies"]
        against = body["against_plain_frontier"]
        assert isinstance(policies, dict) and isinstance(against, dict)
        for name, row in policies.items():
            at = against[name]["plain_cost_at_this_loss"]
            lines.append(
                f"| {workload} | {name} | {row['cost_usd']:.3f} | {row['large_share']:.1%} | "
                f"{row['expected_loss']:.1f} ({row['loss_per_request']:.4f}) | "
                f"{'n/a' if at is None else f'{at:.3f}'} |"
            )
    lines.append("")  # the note after the table, not a row of it
    lines.append(
        "net expected loss: the scores sent small summed, below 0 where the small model is "
        "predicted the better (each row's expected_gain in the JSON)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m services.tools.bench.router")
    parser.add_argument("--workloads", nargs="+", default=["agent", "tools", "mix"], choices=NAMES)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("bench-results/router-replay.json"))
    parser.add_argument(
        "--sweep",
        choices=("plain", "both", "none"),
        default="plain",
        help="sweep the plain router's threshold (the frontier), also the cost-aware router's "
        "base threshold (twice the replays), or neither",
    )
    args = parser.parse_args(argv)
    refuse_unwritable(parser, args.out)  # before the run, not after it
    at_least(parser, 1, requests=args.requests)
    at_least(parser, 0, interval_ms=args.interval_ms)
    shared = Shared(load_minilm_embedder(threads=1), load_cl100k(), load_cross_encoder(threads=1))
    bench = Bench(args, shared)
    workloads = {workload: bench.workload(workload) for workload in args.workloads}
    report = {"expected_loss": LOSS_MEANS, "workloads": workloads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(_table(workloads))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    with tokenizer_error_exits("bench.router"):  # a vocabulary missing: what to do, exit 2
        raise SystemExit(main())
