"""Latency and cost aggregation for the load test."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.by_kind: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.cost_nanos = 0
        self.baseline_nanos = 0
        self.wall_s = 0.0

    def add(self, kind: str, response: pb.CompleteResponse, seconds: float) -> None:
        layer = pb.Layer.Name(response.served_by)
        self.latencies[layer].append(seconds)
        self.latencies["all"].append(seconds)
        self.by_kind[f"{kind}:{layer}"] += 1
        self.cost_nanos += response.cost.cost_nanos
        self.baseline_nanos += response.cost.baseline_nanos

    def error(self, kind: str, code: str) -> None:
        self.errors[f"{kind}:{code}"] += 1

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies["all"])
        return {
            "completed": done,
            "errors": dict(self.errors),
            "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(done / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_ms": {
                layer: {
                    "n": len(values),
                    "p50": round(percentile(values, 0.5) * 1000, 2),
                    "p99": round(percentile(values, 0.99) * 1000, 2),
                }
                for layer, values in sorted(self.latencies.items())
            },
            "served": dict(sorted(self.by_kind.items())),
            "cost_usd": self.cost_nanos / 1e9,
            "baseline_usd": self.baseline_nanos / 1e9,
            "saved_fraction": round(1 - self.cost_nanos / self.baseline_nanos, 4)
            if self.baseline_nanos
            else 0.0,
        }
