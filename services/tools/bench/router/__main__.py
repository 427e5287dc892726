"""``python -m services.tools.bench.router``: dollars of the cost-aware learned router against
the plain learned router (no prefix-cache weighing) and always-large, on the estimator's agent
(tau-bench), tools (BFCL) and mixed workloads, L1 bypassed (the router alone is measured).
Writes bench-results/router-replay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path

from cachemesh.loadtest.reqlog import LogRecord
from cachemesh.loadtest.workloads import WorkloadSpec, build
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.tools.estimator.offline import OfflineStack
from services.tools.estimator.replay import WhatIf, replay
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[4]
POLICIES = {
    "cost_aware_learned": ("auto", {}),
    "plain_learned": ("auto", {"ROUTER_COST_AWARE": "false"}),
    "always_large": ("sim-large", {}),
}


def _records(workload: str, requests: int, interval_ms: int, data: Path) -> list[LogRecord]:
    source = build(WorkloadSpec(workload, 7, "router-replay", data))
    return [LogRecord(i * interval_ms, source.next_item()) for i in range(requests)]


async def _run(settings: dict[str, str], records: list[LogRecord], model: str) -> dict[str, object]:
    stack = OfflineStack(settings, ManualClock())
    for record in records:
        record.item.request.model = model
    samples = await replay(stack, records, WhatIf(l1=False))
    ok = [s for s in samples if s.ok]
    large = sum(1 for s in ok if s.model == "sim-large")
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "cost_usd": round(sum(s.cost_nanos for s in ok) / 1e9, 4),
        "large_share": round(large / max(len(ok), 1), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.tools.bench.router")
    parser.add_argument("--workloads", nargs="+", default=["agent", "tools", "mix"])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("bench-results/router-replay.json"))
    args = parser.parse_args(argv)
    report: dict[str, object] = {}
    for workload in args.workloads:
        rows: dict[str, object] = {}
        for name, (model, over) in POLICIES.items():
            settings = Stack(ROOT, env_overrides=over).settings()
            records = [
                replace(r, item=replace(r.item, request=_copy(r.item.request)))
                for r in _records(workload, args.requests, args.interval_ms, args.data)
            ]
            rows[name] = asyncio.run(_run(settings, records, model))
            print(workload, name, rows[name], flush=True)
        report[workload] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


def _copy(request: pb.CompleteRequest) -> pb.CompleteRequest:
    out = pb.CompleteRequest()
    out.CopyFrom(request)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
