"""Each bench figure as a ratio to its reference, measured in the same run (pure).

Hits ((a), (b)) are divided by the two-hop echo, misses ((c) agent, (c2) unrelated) by the
echo chain of their own shape and size, at the same number in flight; (b) also by the
embedder alone; the traced runs by the untraced ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.tools.bench.gateway.runs import AGENT, EXACT, MIXED, SEMANTIC, UNRELATED

# case -> (its echo reference under results.references, the chain within it or None)
REFERENCES: dict[str, tuple[str, str | None]] = {
    EXACT: ("echo_two_hops", None),
    SEMANTIC: ("echo_two_hops", None),
    AGENT: ("echo_miss_chain", "agent"),
    UNRELATED: ("echo_miss_chain", "unrelated"),
}
L1_CASES = (EXACT, SEMANTIC)  # judged by the L1 layer's latency


def ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 3) if reference else None


def _echo(references: Mapping[str, Any], key: tuple[str, str | None]) -> dict[int, Any]:
    name, part = key
    reference = references[name] if part is None else references[name][part]
    return {row["concurrency"]: row for row in reference["levels"]}


def _latency(case: str, row: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """Which latency a case is judged by: the L1 layer's for hits (when any were served)."""
    by_layer = row["latency_ms"]["by_layer"]
    if case in L1_CASES and "semantic_cache" in by_layer:
        return "semantic_cache", by_layer["semantic_cache"]
    return "all", row["latency_ms"]["all"]


def point(
    case: str, row: Mapping[str, Any], echo: Mapping[str, Any], echo_name: str
) -> dict[str, Any]:
    of, latency = _latency(case, row)
    ref = echo["latency_ms"]
    entry: dict[str, Any] = {
        "concurrency": row["concurrency"],
        "throughput_rps": row["throughput_rps"],
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "latency_of": of,
        "served_by": row["served_by"],
        "errors": row["errors"],
        "echo": echo_name,
        "echo_throughput_rps": echo["throughput_rps"],
        "echo_p50_ms": ref["p50"],
        "throughput_vs_echo": ratio(row["throughput_rps"], echo["throughput_rps"]),
        "p50_vs_echo": ratio(latency["p50"], ref["p50"]),
        "p99_vs_echo": ratio(latency["p99"], ref["p99"]),
    }
    if "cpu" in row:
        entry["cpu_ms_per_request"] = row["cpu"]["ms_per_request"]
    return entry


def _embedder(entry: dict[str, Any], embedder: Mapping[str, Any]) -> None:
    entry["p50_vs_embedder_single"] = ratio(
        entry["p50_ms"], embedder["single"]["latency_ms"]["p50"]
    )
    entry["throughput_vs_embedder_batched"] = ratio(
        entry["throughput_rps"], embedder["batched"]["sentences_per_s"]
    )


def _mixed(mixed: Mapping[str, Any], echo: Mapping[int, Any]) -> dict[str, Any]:
    return {
        "saved_fraction": mixed["cost"]["saved_fraction"],
        "saved_by_layer_nanos": {k: v["saved_nanos"] for k, v in mixed["cost"]["by_layer"].items()},
        "hit_rate": mixed["hit_rate"],
        "throughput_rps": mixed["throughput_rps"],
        "throughput_vs_echo": ratio(mixed["throughput_rps"], echo[8]["throughput_rps"]),
        "wrong_l1_hits": (mixed["labels"] or {}).get("wrong"),
    }


def tracing_ratios(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per traced case and level: req/s, p50 and CPU per request with export on and off."""
    tracing = results["tracing"]
    if "skipped" in tracing:
        return dict(tracing)
    receiver = tracing["receiver"]
    out: dict[str, Any] = {
        "spans_received": receiver["spans_received"],
        "spans_per_request": ratio(receiver["spans_received"], receiver["requests_sent"]),
        "by_service": receiver["by_service"],
    }
    for case, on_rows in tracing["on"].items():
        off_rows = {row["concurrency"]: row for row in results["cases"][case]}
        out[case] = []
        for on in on_rows:
            off = off_rows[on["concurrency"]]
            entry = {
                "concurrency": on["concurrency"],
                "throughput_rps_off": off["throughput_rps"],
                "throughput_rps_on": on["throughput_rps"],
                "throughput_on_vs_off": ratio(on["throughput_rps"], off["throughput_rps"]),
                "p50_ms_off": off["latency_ms"]["all"]["p50"],
                "p50_ms_on": on["latency_ms"]["all"]["p50"],
                "p50_on_vs_off": ratio(
                    on["latency_ms"]["all"]["p50"], off["latency_ms"]["all"]["p50"]
                ),
            }
            if "cpu" in on and "cpu" in off:
                entry["cpu_ms_per_request_off"] = off["cpu"]["ms_per_request"]["total"]
                entry["cpu_ms_per_request_on"] = on["cpu"]["ms_per_request"]["total"]
            out[case].append(entry)
    return out


def case_ratios(results: Mapping[str, Any]) -> dict[str, Any]:
    references = results["references"]
    out: dict[str, Any] = {}
    for case, key in REFERENCES.items():
        rows = results["cases"][case]
        if not isinstance(rows, list):  # {"skipped": why}
            out[case] = dict(rows)
            continue
        echo = _echo(references, key)
        name = ".".join(k for k in key if k)
        out[case] = [point(case, row, echo[row["concurrency"]], name) for row in rows]
        if case == SEMANTIC:
            for entry in out[case]:
                _embedder(entry, references["embedder"])
    out[MIXED] = _mixed(results["cases"][MIXED], _echo(references, REFERENCES[EXACT]))
    out["tracing"] = tracing_ratios(results)
    return out
