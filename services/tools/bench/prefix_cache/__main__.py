"""``python -m services.tools.bench.prefix_cache --out bench-results/prefix.json``

Replays ../shared/data through prefix-cache's accounting (tau-bench airline conversations under
Anthropic 5-minute, Anthropic 1-hour and OpenAI rules) and an arrival trace through KV-aware
routing (``--trace``, by default the Mooncake synthetic trace; any file of the same format):
2, 4 and 8 replicas under round robin, SGLang's rule and the predicted-TTFT policy, with the
unbounded single-replica hit rate as the ceiling, and per replica count the pooled-LRU reference
and optimal replacement's ceiling (``ceiling``). No servers; a virtual clock; one JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from cachemesh._argv import Parser
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import load_model_table
from services.common.tokens import load_tokenizers, tokenizer_error_exits
from services.tools.arg_checks import at_least
from services.tools.bench.prefix_cache import mooncake, tau
from services.tools.out_path import refuse_unwritable

DATA = Path("../shared/data")
REPLICAS = (2, 4, 8)
POLICIES = ("round_robin", "sglang", "ttft")
TRACE = "synthetic_trace.jsonl"  # the default trace, under <data>/prefix


async def run(
    args: argparse.Namespace, trace_path: Path, rows: list[mooncake.Row]
) -> dict[str, Any]:
    """``rows``: the arrival trace at ``trace_path``, read before the tau-bench replays (a bad
    trace is refused at once, not after them)."""
    table = load_model_table()
    tokenizer = load_tokenizers(table.models.values())  # gpt rows: o200k_base
    data = Path(args.data)
    sonnet, gpt4o = table.models["claude-sonnet-4"], table.models["gpt-4o"]
    others = (table.models["gpt-4-1"], table.models["gpt-5"])
    conversations = tau.load(data / "agent" / "tau_bench", args.conversations)  # once
    replays = {  # name: the model, its breakpoints' TTL, the models also priced
        "anthropic_5m": (sonnet, pb.CACHE_TTL_5M, ()),
        "anthropic_1h": (sonnet, pb.CACHE_TTL_1H, ()),
        "openai": (gpt4o, pb.CACHE_TTL_5M, others),
    }
    tau.check(conversations, table, [(m, ttl) for m, ttl, _ in replays.values()])  # at once
    results: dict[str, Any] = {
        "tau_bench_airline": {
            "clock": {
                "start_gap_s": tau.START_GAP_S,
                "model_s": tau.MODEL_S,
                "think_mean_s": tau.THINK_MEAN_S,
                "seed": tau.SEED,
            },
            **{
                name: await tau.replay(table, tokenizer, model, ttl, conversations, priced)
                for name, (model, ttl, priced) in replays.items()
            },
        }
    }
    runs = []
    for n in REPLICAS:
        for policy in POLICIES:
            run = mooncake.simulate(rows, n, policy, args.capacity_blocks)
            print(_row(run), flush=True)
            runs.append(run)
    results["mooncake_kv_routing"] = {
        "trace": str(trace_path),
        "requests": len(rows),
        "ideal_kv_hit_rate_tokens": mooncake.ideal_hit_rate(rows),
        # one LRU cache with all n replicas' memory: the reference for n LRU engines
        "pooled_lru_kv_hit_rate_tokens": {
            str(n): mooncake.pooled_lru_hit_rate(rows, n * args.capacity_blocks) for n in REPLICAS
        },
        # that LRU cache admitting only the blocks used again (the future known): what
        # admission control in the engines would add; routing cannot decide admission
        "admitting_lru_kv_hit_rate_tokens": {
            str(n): mooncake.admitting_lru_hit_rate(rows, n * args.capacity_blocks)
            for n in REPLICAS
        },
        # optimal replacement (Belady) with n replicas' memory: what any router could reach
        "belady_kv_hit_rate_tokens": {
            str(n): mooncake.belady_hit_rate(rows, n * args.capacity_blocks) for n in REPLICAS
        },
        "kv_capacity_blocks_per_replica": args.capacity_blocks,
        "kv_capacity_tokens_per_replica": args.capacity_blocks * 16,
        "prefill_tokens_per_s": mooncake.PREFILL_TPS,
        "decode_tokens_per_s": mooncake.DECODE_TPS,
        "runs": runs,
    }
    return results


def _row(run: dict[str, Any]) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in run["route_reasons"].items())
    return (
        f"{run['replicas']} replicas {run['policy']:>11}: KV hit {run['kv_hit_rate_tokens']:.1%}"
        f"  TTFT p50 {run['ttft_p50_s']} s p99 {run['ttft_p99_s']} s"
        f"  busiest {run['busiest_replica_share']:.1%}  ({reasons})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m services.tools.bench.prefix_cache")
    parser.add_argument("--out", default="bench-results/prefix.json")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--capacity-blocks", type=int, default=65536)
    parser.add_argument("--trace", default="", help="an arrival trace (Mooncake's JSONL format)")
    args = parser.parse_args(argv)
    refuse_unwritable(parser, args.out)  # before the run, not after it
    # before anything runs: 0 conversations divided by zero after the replays, -1 replayed
    # all but the last one (a slice) as if asked, a capacity below 1 a ValueError traceback
    at_least(parser, 1, conversations=args.conversations, capacity_blocks=args.capacity_blocks)
    started = time.monotonic()
    trace_path = Path(args.trace) if args.trace else Path(args.data) / "prefix" / TRACE
    try:
        rows = mooncake.load_trace(trace_path)
    except mooncake.TraceError as exc:
        print(f"bench-prefix: {exc}", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(run(args, trace_path, rows))
    except tau.TauError as exc:
        print(f"bench-prefix: {exc}", file=sys.stderr)
        return 2
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    routing = results["mooncake_kv_routing"]
    print(f"ideal (one unbounded replica): KV hit {routing['ideal_kv_hit_rate_tokens']:.1%}")
    for n, rate in routing["pooled_lru_kv_hit_rate_tokens"].items():
        admitting = routing["admitting_lru_kv_hit_rate_tokens"][n]
        print(
            f"one LRU cache with {n} replicas' memory: KV hit {rate:.1%}"
            f" (admitting only blocks used again: {admitting:.1%};"
            f" optimal replacement: {routing['belady_kv_hit_rate_tokens'][n]:.1%})"
        )
    for each in routing["runs"]:
        print(_row(each))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with tokenizer_error_exits("bench.prefix_cache"):  # a vocabulary missing: what to do, exit 2
        sys.exit(main())
