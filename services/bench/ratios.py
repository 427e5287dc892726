"""Each bench figure as a ratio to its reference, measured in the same run."""

from __future__ import annotations

from typing import Any


def _ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 2) if reference else None


def case_ratios(results: dict[str, Any]) -> dict[str, Any]:
    refs = results["references"]
    echo = {row["concurrency"]: row for row in refs["echo_two_hops"]}
    embed = refs["embedder"]
    out: dict[str, Any] = {}
    layers = {"a_exact_hit": "semantic_cache", "b_semantic_hit": "semantic_cache"}
    for case, rows in results["cases"].items():
        if case == "d_mixed":
            continue
        out[case] = []
        for row in rows:
            level = row["concurrency"]
            layer = row["latency_ms"]["by_layer"].get(
                layers.get(case, ""), row["latency_ms"]["all"]
            )
            entry = {
                "concurrency": level,
                "throughput_rps": row["throughput_rps"],
                "p50_ms": layer["p50"],
                "p99_ms": layer["p99"],
                "served_by": row["served_by"],
                "throughput_vs_echo": _ratio(row["throughput_rps"], echo[level]["throughput_rps"]),
                "p50_vs_echo": _ratio(layer["p50"], echo[level]["latency_ms"]["p50"]),
            }
            if case == "b_semantic_hit":
                entry["p50_vs_embedder_single"] = _ratio(
                    layer["p50"], embed["single"]["latency_ms"]["p50"]
                )
                entry["throughput_vs_embedder_batched"] = _ratio(
                    row["throughput_rps"], embed["batched"]["sentences_per_s"]
                )
            out[case].append(entry)
    mixed = results["cases"]["d_mixed"]
    out["d_mixed"] = {
        "saved_fraction": mixed["cost"]["saved_fraction"],
        "saved_by_layer_nanos": {k: v["saved_nanos"] for k, v in mixed["cost"]["by_layer"].items()},
        "hit_rate": mixed["hit_rate"],
        "throughput_vs_echo": _ratio(mixed["throughput_rps"], echo[8]["throughput_rps"]),
        "wrong_l1_hits": (mixed["labels"] or {}).get("wrong"),
    }
    return out
