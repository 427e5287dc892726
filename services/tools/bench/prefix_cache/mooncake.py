"""The Mooncake trace replayed through KV-aware routing on a virtual clock.

One hash id stands for 512 tokens, i.e. 32 blocks of 16: block j of hash id h gets a key
chained from its parent's, like the engine's chained block hashes. Each replica's KV cache is
the engine's ``KvBlockCache`` (LRU, ``capacity_blocks``); prefix-cache's ``ReplicaViews`` ranks
the replicas and the router's ``choose`` (SGLang's load rule) picks one, with the load being
the requests in flight on each replica. Round-robin is the baseline.

Simulated time: a replica prefills one request at a time, FIFO, at ``prefill_tps`` tokens/s
for the tokens its cache does not hold; TTFT = queueing + prefill. Decode runs alongside at
``decode_tps`` tokens/s a request and only decides how long a request stays in flight.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.kv_blocks import BLOCK_SIZE, KvBlockCache
from services.prefix_cache.replica_view import ReplicaViews
from services.router.balance import BalancePolicy, choose

HASH_BLOCK_TOKENS = 512
PREFILL_TPS, DECODE_TPS = 25_000.0, 50.0


@dataclass(frozen=True)
class Row:
    at_s: float
    input_tokens: int
    output_tokens: int
    keys: tuple[bytes, ...]


def load_trace(path: Path) -> list[Row]:
    rows: list[Row] = []
    for line in path.read_text().splitlines():
        raw = json.loads(line)
        full_blocks = raw["input_length"] // BLOCK_SIZE
        keys: list[bytes] = []
        parent = b"mooncake"
        for h in raw["hash_ids"]:
            for j in range(HASH_BLOCK_TOKENS // BLOCK_SIZE):
                if len(keys) == full_blocks:
                    break
                parent = hashlib.blake2b(parent + f"{h}/{j}".encode(), digest_size=16).digest()
                keys.append(parent)
        rows.append(
            Row(raw["timestamp"] / 1000, raw["input_length"], raw["output_length"], tuple(keys))
        )
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(rows: list[Row], replicas: int, policy: str, capacity_blocks: int) -> dict[str, Any]:
    names = [f"replica-{i}" for i in range(replicas)]
    truth = {name: KvBlockCache(capacity_blocks) for name in names}
    views = ReplicaViews(capacity_blocks)
    balance = BalancePolicy()
    free_at = dict.fromkeys(names, 0.0)
    inflight: dict[str, list[float]] = {name: [] for name in names}
    served = dict.fromkeys(names, 0)
    reasons: dict[str, int] = {}
    ttfts: list[float] = []
    hit_tokens = input_tokens = 0
    for i, row in enumerate(rows):
        now = row.at_s
        for heap in inflight.values():
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        if policy == "round_robin":
            chosen = names[i % replicas]
        else:
            ranked = sorted(
                ((n, views.match(n, row.keys, row.input_tokens)) for n in names),
                key=lambda c: -c[1],
            )
            loads = {n: len(h) for n, h in inflight.items()}
            route = choose(ranked, loads, row.input_tokens, balance)
            chosen = route.order[0]
            reasons[route.reason] = reasons.get(route.reason, 0) + 1
        cached = truth[chosen].cached_tokens(row.keys, row.input_tokens)
        truth[chosen].insert(row.keys)
        views.record(chosen, row.keys, row.input_tokens, cached)
        start = max(now, free_at[chosen])
        free_at[chosen] = start + (row.input_tokens - cached) / PREFILL_TPS
        ttfts.append(free_at[chosen] - now)
        heapq.heappush(inflight[chosen], free_at[chosen] + row.output_tokens / DECODE_TPS)
        served[chosen] += 1
        hit_tokens += cached
        input_tokens += row.input_tokens
    result: dict[str, Any] = {
        "replicas": replicas,
        "policy": policy,
        "requests": len(rows),
        "kv_hit_rate_tokens": round(hit_tokens / max(input_tokens, 1), 4),
        "ttft_p50_s": round(_percentile(ttfts, 0.50), 3),
        "ttft_p99_s": round(_percentile(ttfts, 0.99), 3),
        "busiest_replica_share": round(max(served.values()) / len(rows), 4),
        "requests_per_replica": served,
    }
    if reasons:
        result["route_reasons"] = reasons
    if policy != "round_robin":
        result["view_abs_error_tokens"] = views.stats.abs_error_tokens
    return result
