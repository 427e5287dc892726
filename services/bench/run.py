"""``python -m services.bench``: runs the standard set and writes the JSON and the chart.

(a) exact L1 hits, (b) semantic L1 hits, each at 1, 8 and 32 in flight against the stack at
``CACHEMESH_TARGET`` (``make bench`` starts it); (c) the miss path (L1 miss, plan, model,
commits, store) at 1, 8 and 32 in flight on a second stack this command starts with
``SIM_TIME_SCALE=0`` and stops afterwards; (d) the mixed workload's savings. References
measured in the same run: a bare two-hop gRPC echo and the embedder alone; each figure is
reported with its ratio to its reference (schema: clients/python/SCHEMA.md, "Bench report").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cachemesh.loadtest import chart, report
from cachemesh.loadtest.cli import keys_from_env
from cachemesh.loadtest.load import check_target, run_load
from cachemesh.loadtest.runner import LoadShape
from cachemesh.loadtest.stats import summarise
from cachemesh.loadtest.workloads import Item
from services.bench import cases
from services.bench.echo import echo_reference
from services.bench.embedder_ref import embedder_reference
from services.bench.ratios import case_ratios
from services.common.config import Env
from services.semantic_cache.config import SemanticCacheConfig
from services.semantic_cache.embedder import load_minilm_embedder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.verifier import Verifier, VerifierWeights
from services.stack.envfile import read_env_file
from services.stack.runner import Stack

ROOT = Path(__file__).resolve().parents[2]
LEVELS = (1, 8, 32)


def _measure(
    target: str, keys: dict[str, str], warm: list[Item], plan: list[Item], level: int, label: str,
    labels: dict[frozenset[str], int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    shape = LoadShape("closed", level, 0.0, duration_s=180.0, stream=False, timeout_s=60.0)
    samples = run_load(target, keys, warm, plan, shape, 1, label)
    return {"concurrency": level, **summarise(samples, labels or {})}


def _zero_stack_cases(args: argparse.Namespace, run: str) -> list[dict[str, Any]]:
    """(c) on a second stack whose simulated model answers without waiting."""
    run_dir = ROOT / ".run" / "bench-zero"
    stack = Stack.on_free_ports(ROOT, run_dir, {"SIM_TIME_SCALE": "0"})
    stack.start()
    try:
        demo = read_env_file(run_dir / "demo-keys.env")
        keys = {"tenant-a": demo["CACHEMESH_KEY_A"]}
        out = []
        for level in LEVELS:
            plan = cases.misses(args.data_dir, f"{run}-miss-{level}", args.requests, level)
            out.append(_measure(stack.router_address, keys, [], plan, level, f"(c) miss x{level}"))
        return out
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.bench", description=__doc__)
    p.add_argument("--target", default=os.environ.get("CACHEMESH_TARGET", "127.0.0.1:50051"))
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--requests", type=int, default=300, help="per case and level")
    p.add_argument("--mixed-requests", type=int, default=400)
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    check_target(args.target, allow_remote=False)
    keys = keys_from_env()
    if "tenant-a" not in keys:
        sys.exit("bench: set CACHEMESH_KEY_A (source .run/demo-keys.env)")
    settings = Stack(ROOT).settings()
    run = f"bench-{time.time_ns()}"
    started = time.monotonic()

    config = SemanticCacheConfig.from_env(Env(settings), OperatingPoint.load())
    embedder = load_minilm_embedder(threads=config.ort_threads)
    sentences = cases.first_questions(args.data_dir, 256)
    references = {
        "echo_two_hops": echo_reference(LEVELS, args.requests * 3, payload_bytes=600),
        "embedder": embedder_reference(embedder, sentences, batch=32),
    }
    verifier = Verifier(VerifierWeights.load(), config.verifier_min_p)  # as the service's
    above = min(1.0, config.threshold + 0.04)
    pairs = cases.paraphrase_pairs(args.data_dir, embedder, above, verifier)
    exact, semantic = [], []
    for level in LEVELS:
        warm, plan = cases.exact_hits(args.data_dir, f"{run}-exact-{level}", args.requests)
        exact.append(_measure(args.target, keys, warm, plan, level, f"(a) exact x{level}"))
        warm, plan = cases.semantic_hits(pairs, f"{run}-semantic-{level}", args.requests)
        semantic.append(_measure(args.target, keys, warm, plan, level, f"(b) semantic x{level}"))
    items, params, labels = cases.mixed(args.data_dir, f"{run}-mixed", args.mixed_requests, 7)
    mixed = _measure(args.target, keys, [], items, 8, "(d) mixed x8", labels)
    miss = _zero_stack_cases(args, run)

    doc = report.document(
        run={"target": args.target, "levels": list(LEVELS), "requests_per_level": args.requests,
             "mixed_requests": args.mixed_requests, "paraphrase_pairs": len(pairs),
             "namespace": run, "elapsed_s": round(time.monotonic() - started, 1)},
        workload={"mixed": params},
        stack=settings,
        results={"references": references, "cases": {
            "a_exact_hit": exact, "b_semantic_hit": semantic, "c_miss_path_sim_zero": miss,
            "d_mixed": mixed}},
    )  # fmt: skip
    doc["schema"] = "cachemesh.bench.v1"
    doc["ratios"] = case_ratios(doc["results"])
    day = time.strftime("%Y-%m-%d")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"bench-{day}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    runs = [(f"(a) exact hits, {r['concurrency']} in flight", r) for r in exact]
    runs += [(f"(b) semantic hits, {r['concurrency']} in flight", r) for r in semantic]
    runs += [(f"(c) miss path (SIM_TIME_SCALE=0), {r['concurrency']} in flight", r) for r in miss]
    runs += [("(d) mixed workload, 8 in flight", mixed)]
    page = chart.render_html(f"cachemesh bench {day}", runs, doc["ratios"])
    (args.out_dir / f"bench-{day}.html").write_text(page)
    print(report.table(mixed))
    print(json.dumps(doc["ratios"], indent=2))
    print(f"bench: {out} and {out.with_suffix('.html')} ({doc['run']['elapsed_s']} s)")
