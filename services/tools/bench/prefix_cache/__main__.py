"""``python -m services.tools.bench.prefix_cache --out bench-results/prefix.json``

Replays ../shared/data through prefix-cache's accounting (tau-bench airline conversations under
Anthropic 5-minute, Anthropic 1-hour and OpenAI rules) and through KV-aware routing (the
Mooncake trace, 2 and 4 replicas, cache-aware against round-robin). No servers; a virtual
clock; one JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import load_model_table
from services.common.tokens import load_cl100k
from services.tools.bench.prefix_cache import mooncake, tau

DATA = Path("../shared/data")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    table, tokenizer = load_model_table(), load_cl100k()
    data = Path(args.data)
    sonnet, gpt4o = table.models["claude-sonnet-4"], table.models["gpt-4o"]
    others = (table.models["gpt-4-1"], table.models["gpt-5"])
    tau_dir, limit = data / "agent" / "tau_bench", args.conversations
    results: dict[str, Any] = {
        "tau_bench_airline": {
            "clock": {
                "start_gap_s": tau.START_GAP_S,
                "model_s": tau.MODEL_S,
                "think_mean_s": tau.THINK_MEAN_S,
                "seed": tau.SEED,
            },
            "anthropic_5m": await tau.replay(
                table, tokenizer, sonnet, pb.CACHE_TTL_5M, tau_dir, limit
            ),
            "anthropic_1h": await tau.replay(
                table, tokenizer, sonnet, pb.CACHE_TTL_1H, tau_dir, limit
            ),
            "openai": await tau.replay(
                table, tokenizer, gpt4o, pb.CACHE_TTL_5M, tau_dir, limit, others
            ),
        }
    }
    rows = mooncake.load_trace(data / "prefix" / "synthetic_trace.jsonl")
    runs = [
        mooncake.simulate(rows, n, policy, args.capacity_blocks)
        for n in (2, 4)
        for policy in ("cache_aware", "round_robin")
    ]
    results["mooncake_kv_routing"] = {
        "kv_capacity_blocks_per_replica": args.capacity_blocks,
        "kv_capacity_tokens_per_replica": args.capacity_blocks * 16,
        "prefill_tokens_per_s": mooncake.PREFILL_TPS,
        "decode_tokens_per_s": mooncake.DECODE_TPS,
        "runs": runs,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.tools.bench.prefix_cache")
    parser.add_argument("--out", default="bench-results/prefix.json")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--capacity-blocks", type=int, default=65536)
    args = parser.parse_args()
    started = time.monotonic()
    results = asyncio.run(run(args))
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
