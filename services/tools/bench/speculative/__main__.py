"""``python -m services.tools.bench.speculative --out bench-results/speculative.json``

The simulator's speculative decoding measured in wall-clock time: sim-large's answers to the
same prompts decoded plainly and with sim-small as its draft, for a grid of (alpha, k), with
the engine's real ``asyncio`` sleeps (scaled by ``--time-scale``). Writes the measured decode
speed-up next to Leviathan et al.'s expected speed-up E / (k c + 1) and next to E alone (the
speed-up of a draft that costs nothing), c being sim-small's time per token over sim-large's.
sim-small's table speed makes it an expensive draft (c = 70/180 = 0.39); a second series runs a
draft of sim-small's kind at ``--fast-draft-c`` (0.05, a draft ~20x faster than its target, as
the paper's small drafts are) to show where the 2-3x speed-ups come from.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachemesh._argv import Parser
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelSpec, ModelTable, load_model_table
from services.common.tokens import Tokenizer, load_cl100k, tokenizer_error_exits
from services.model.engine import Finished, SimEngine, Started
from services.model.kv_cache import KvBlockCache
from services.model.speculative import (
    Drafting,
    cost_ratio,
    expected_speedup,
    expected_tokens_per_step,
)
from services.tools.arg_checks import at_least, finite_over
from services.tools.out_path import refuse_unwritable

GRID = [(0.6, 2), (0.6, 4), (0.8, 2), (0.8, 4), (0.8, 8), (0.9, 4), (0.9, 8), (0.95, 8)]


def _engine(tokenizer: Tokenizer, table: ModelTable, scale: float, d: Drafting | None) -> SimEngine:
    return SimEngine(
        models={"sim-large": table.models["sim-large"]},
        replica_id="bench",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(100_000),
        time_scale=scale,
        drafting={} if d is None else {"sim-large": d},
    )


async def _decode_seconds(engine: SimEngine, prompts: int) -> tuple[float, int, int]:
    """Wall-clock seconds from the first token's start to the end, tokens, kept draft tokens."""
    seconds, tokens, accepted = 0.0, 0, 0
    for i in range(prompts):
        text = f"benchmark question {i}: which policy keeps answer {i * 104729} fresh?"
        request = pb.CompleteRequest(
            model="sim-large",
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
            max_tokens=4096,
        )
        prepared = engine.prepare("bench", "sim-large", request)
        began = 0.0
        async for event in engine.run(prepared):
            if isinstance(event, Started):
                began = time.perf_counter()
            elif isinstance(event, Finished):
                seconds += time.perf_counter() - began
                tokens += event.output_tokens
                accepted += event.draft_accepted_tokens
    return seconds, tokens, accepted


async def run(prompts: int, scale: float, fast_c: float) -> dict[str, Any]:
    table, tokenizer = load_model_table(), load_cl100k()
    large, small = table.models["sim-large"], table.models["sim-small"]
    fast = small.model_copy(update={"decode_tokens_per_s": large.decode_rate / fast_c})
    plain_s, tokens, _ = await _decode_seconds(_engine(tokenizer, table, scale, None), prompts)
    series = {}
    for name, draft in (("sim-small", small), ("fast-draft", fast)):
        series[name] = await _series(tokenizer, table, scale, prompts, draft, plain_s, tokens)
    return {
        "what": "sim-large decode, plain vs drafting, wall clock with real sleeps",
        "time_scale": scale,
        "prompts": prompts,
        "output_tokens": tokens,
        "plain_decode_tokens_per_s": round(tokens * scale / plain_s, 1),
        "series": series,
    }


async def _series(
    tokenizer: Tokenizer,
    table: ModelTable,
    scale: float,
    prompts: int,
    draft: ModelSpec,
    plain_s: float,
    tokens: int,
) -> dict[str, Any]:
    c = cost_ratio(table.models["sim-large"], draft)
    rows = []
    for alpha, k in GRID:
        engine = _engine(tokenizer, table, scale, Drafting(draft, k, alpha))
        spec_s, spec_tokens, accepted = await _decode_seconds(engine, prompts)
        assert spec_tokens == tokens  # the same answers
        rows.append(
            {
                "alpha": alpha,
                "k": k,
                "measured_speedup": round(plain_s / spec_s, 3),
                "expected_speedup": round(expected_speedup(alpha, k, c), 3),
                "expected_tokens_per_step": round(expected_tokens_per_step(alpha, k), 3),
                "accepted_draft_tokens": accepted,
                "decode_tokens_per_s": round(tokens * scale / spec_s, 1),
            }
        )
    return {"draft_cost_ratio_c": round(c, 4), "cases": rows}


def _parser() -> Parser:
    """The bench's command line (built without running anything: tests read it)."""
    built = Parser(description=__doc__)
    built.add_argument("--out", type=Path, default=Path("bench-results/speculative.json"))
    built.add_argument("--prompts", type=int, default=20)
    built.add_argument("--time-scale", type=float, default=0.5)
    built.add_argument("--fast-draft-c", type=float, default=0.05)
    return built


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    refuse_unwritable(parser, args.out)  # before the run, not after it
    at_least(parser, 1, prompts=args.prompts)
    finite_over(parser, 0, time_scale=args.time_scale, fast_draft_c=args.fast_draft_c)
    result = asyncio.run(run(args.prompts, args.time_scale, args.fast_draft_c))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, series in result["series"].items():
        print(f"draft {name}, c = {series['draft_cost_ratio_c']}")
        print(f"{'alpha':>5} {'k':>2} {'measured':>9} {'E/(kc+1)':>9} {'E (c=0)':>8}")
        for row in series["cases"]:
            print(
                f"{row['alpha']:>5} {row['k']:>2} {row['measured_speedup']:>9} "
                f"{row['expected_speedup']:>9} {row['expected_tokens_per_step']:>8}"
            )
    print(f"written to {args.out}")


if __name__ == "__main__":  # importing the module runs nothing
    with tokenizer_error_exits("bench.speculative"):  # a vocabulary missing: exit 2
        main()
