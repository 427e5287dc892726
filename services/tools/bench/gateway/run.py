"""``python -m services.tools.bench.gateway`` (``make bench``): the standard set, its references
and ratios.

It starts its own stacks on free loopback ports (never the ports of a ``make up`` stack) and
stops them: (a) exact L1 hits, (b) semantic L1 hits, (c) misses of tau-bench agent requests
and (c2) of single-turn MMLU/GSM8K prompts, the simulated model answering at once
(``SIM_TIME_SCALE=0``), each at 1, 8 and 32 in flight; (a) and (c) again with every span
exported to a real OTLP receiver; the CPU each service spends per request; (d) the mixed
workload's savings. References measured in the same run: a two-hop gRPC echo, an echo chain
of a miss's shape for each miss case, the embedder alone. ``--target`` measures (a), (b) and
(d) on a stack already running instead. Schema: clients/python/SCHEMA.md, "Bench report".
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from cachemesh._argv import Parser
from cachemesh.envfile import read_env_file
from cachemesh.loadtest.cli import keys_from_env
from cachemesh.loadtest.load import NoGateway, NotLoopback, check_gateway, check_target
from services.common.env import Env
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.wiring import build_verifier
from services.tools.arg_checks import at_least
from services.tools.bench.gateway import cases, http_path, output, runs, summary
from services.tools.bench.gateway.chain import Chain, miss_chain, two_hop
from services.tools.bench.gateway.echo import chain_reference
from services.tools.bench.gateway.embedder_ref import embedder_reference
from services.tools.bench.gateway.ratios import case_ratios
from services.tools.bench.gateway.redact import own_settings, setting_names
from services.tools.bench.gateway.runs import AGENT, EXACT, MIXED, UNRELATED, Outcome, Plan
from services.tools.bench.gateway.stacks import Target
from services.tools.out_path import refuse_unwritable
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[4]
LEVELS = (1, 8, 32)
TWO_HOP_PAYLOAD_BYTES = 600


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m services.tools.bench.gateway", description=__doc__)
    p.add_argument("--target", default=None,
                   help="a running stack's router (loopback): only (a), (b), (d) run on it; "
                        "keys from CACHEMESH_KEY_A/B")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--requests", type=int, default=300, help="per case and level")
    p.add_argument("--mixed-requests", type=int, default=400)
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    return p


def _chains(plan: Plan) -> dict[str, Chain]:
    """Case -> the shape of its echo reference: the two hops of a hit, a miss of each miss
    case."""
    agent = cases.agent_misses(plan.data_dir, "shape", plan.requests, seed=1)
    unrelated = cases.misses(plan.data_dir, "shape", plan.requests, seed=1)
    return {
        EXACT: two_hop(TWO_HOP_PAYLOAD_BYTES),
        AGENT: miss_chain("agent", [i.request for i in agent]),
        UNRELATED: miss_chain("unrelated", [i.request for i in unrelated]),
    }


def _references(
    plan: Plan, embedder: Embedder, chains: dict[str, Chain], interleaved: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Every reference; those in ``interleaved`` (case -> its echo, measured around the
    case's runs on the bench's own stacks) are taken as measured there, the others now."""

    def echo(case: str) -> dict[str, Any]:
        if case in interleaved:
            return interleaved[case]
        return chain_reference(chains[case], plan.levels, runs.echo_requests(plan, case))

    return {
        "echo_two_hops": echo(EXACT),
        "echo_miss_chain": {"agent": echo(AGENT), "unrelated": echo(UNRELATED)},
        "embedder": embedder_reference(
            embedder, cases.first_questions(plan.data_dir, 256), batch=32
        ),
    }


def _charts(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    charts: list[tuple[str, dict[str, Any]]] = []
    for case, title in summary.TITLES.items():
        rows = results["cases"][case]
        if isinstance(rows, list):
            charts += [(f"{title}, {r['concurrency']} in flight", r) for r in rows]
    for case, rows in results["tracing"].get("on", {}).items():
        title = summary.TITLES[case]
        charts += [(f"{title}, traced, {r['concurrency']} in flight", r) for r in rows]
    charts.append(("(d) mixed workload, 8 in flight", results["cases"][MIXED]))
    return charts


def _outcome(args: argparse.Namespace, plan: Plan, echoes: dict[str, Chain]) -> Outcome:
    if args.target is None:
        return runs.own_stacks(plan, echoes)
    keys = _target_keys(args.target)
    outcome = runs.against_target(plan, Target(args.target, keys, None, "target"))
    outcome.secrets += keys.values()
    return outcome


def _target_keys(target: str) -> dict[str, str]:
    """The keys for ``--target``, once it is known to be a loopback address where a Gateway
    serves: else the bench exits (1) saying so, before the embedder and the paraphrase pairs
    load (a stack that is not up took 4.5 min to fail, a remote one a traceback advising a
    flag the bench does not have)."""
    try:
        check_target(target, allow_remote=False)
    except NotLoopback:
        sys.exit(f"bench --target {target}: the bench measures a stack on this machine only "
                 "(loopback: 127.0.0.0/8, ::1, localhost)")  # fmt: skip
    try:
        keys = keys_from_env()
    except ValueError as exc:
        sys.exit(f"bench --target: {exc}")
    if "tenant-a" not in keys:
        sys.exit("bench --target: set CACHEMESH_KEY_A (source that stack's demo-keys.env)")
    try:
        check_gateway(target)
    except NoGateway as exc:
        sys.exit(f"bench --target: {exc}")
    return keys


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)  # unwinds through the stacks' finally blocks, which stop them


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    # before the stacks are started and measured, not after
    refuse_unwritable(parser, args.out_dir, "--out-dir", directory=True)
    at_least(parser, 1, requests=args.requests, mixed_requests=args.mixed_requests)
    if args.target is not None:
        _target_keys(args.target)  # before minutes of set-up
    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    settings = Stack(ROOT).settings()
    config = SemanticCacheSettings.from_env(Env(settings), OperatingPoint.load())
    embedder = load_minilm_embedder(threads=config.ort_threads)
    verifier = build_verifier(config)  # as the service's
    above = min(1.0, config.threshold + 0.04)
    wanted = args.requests * len(LEVELS)  # (b): each paraphrase asked once in the run
    pairs = cases.paraphrase_pairs(args.data_dir, embedder, above, verifier, wanted)
    if len(pairs) < wanted:
        sys.exit(f"bench: only {len(pairs)} paraphrase pairs the cache serves in the data, "
                 f"{wanted} wanted for (b); lower --requests")  # fmt: skip
    run = f"bench-{time.time_ns()}"
    plan = Plan(ROOT, args.data_dir, run, LEVELS, args.requests, args.mixed_requests, pairs)
    chains = _chains(plan)
    outcome = _outcome(args, plan, {EXACT: chains[EXACT], AGENT: chains[AGENT]})
    references = _references(plan, embedder, chains, outcome.references)
    if args.target is None:  # (e) the HTTP front beside the gRPC path, on a stack of its own
        outcome.cases[http_path.CASE] = http_path.compare(plan)

    results = {"references": references, "cases": outcome.cases, "tracing": outcome.tracing}
    ratios = case_ratios(results)
    names = setting_names(read_env_file(ROOT / ".env"))
    doc = output.document(
        run={"target": args.target, "levels": list(LEVELS), "requests_per_level": args.requests,
             "hit_requests_per_level": args.requests * runs.HIT_FACTOR,
             "semantic_requests_per_level": args.requests,
             "traced_runs_per_level": runs.REPEATS,
             "mixed_requests": args.mixed_requests, "paraphrase_pairs": len(pairs),
             "namespace": run, "elapsed_s": round(time.monotonic() - started, 1)},
        workload={"mixed": outcome.mixed_params, AGENT: cases.agent_params(args.data_dir),
                  UNRELATED: {"name": "unrelated", "seed": "the level (in flight)",
                       "namespace": "one per request"}},
        stack=own_settings(settings, names, outcome.secrets),
        stacks={name: own_settings(overrides, names, outcome.secrets)
                for name, overrides in outcome.stacks.items()},
        results=results,
        ratios=ratios,
    )  # fmt: skip
    publish(doc, _charts(results), args.out_dir, output.stamp(datetime.now(UTC)))


def publish(
    doc: dict[str, Any], charts: list[tuple[str, dict[str, Any]]], out_dir: Path, when: str
) -> Path:
    """Writes the report and its chart (``charts``: ``_charts``), prints the summary, and
    exits 1 (``make bench`` fails) when a measured point had requests that ended in an
    error: its req/s counts the completed ones only, so its figure is not the case's (a stack
    refusing every request measured 0.0 req/s, ratio 0.000, and exited 0). The report names
    them (``failed_points``)."""
    results, ratios = doc["results"], doc["ratios"]
    failed = summary.failed_points(results)
    doc["failed_points"] = failed
    out = output.write(doc, charts, out_dir, when)
    print(summary.render(results["references"], ratios))
    print(http_path.render(results["cases"].get(http_path.CASE)))
    print(f"bench: {out} and {out.with_suffix('.html')} ({doc['run']['elapsed_s']} s)")
    if failed:
        sys.exit(
            f"bench: {len(failed)} measured point(s) had requests that ended in an error, so "
            "their figures are not the case's (req/s counts the completed only): "
            + "; ".join(failed)
            + f". The report ({out.name}) lists them in failed_points; the stacks' logs say why."
        )
    return out
