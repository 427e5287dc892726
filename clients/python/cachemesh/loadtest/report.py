"""The report: one JSON document (schema in SCHEMA.md) and its terminal table."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

SCHEMA = "cachemesh.loadtest.v1"


def document(
    *, run: Mapping[str, Any], workload: Mapping[str, Any], stack: Mapping[str, str],
    results: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "schema": SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "run": dict(run),
        "workload": dict(workload),
        "stack": dict(stack),
        "results": dict(results),
    }


def _usd(nanos: int) -> str:
    return f"${nanos / 1e9:,.4f}"


def table(results: Mapping[str, Any], *, latency: bool = True) -> str:
    """The terminal view of one run's ``results`` (``latency=False``: the estimator's)."""
    cut = results.get("cut_at_deadline")  # the run's own cuts at its end (not the estimator's)
    lines = [
        f"requests {results['requests']}  completed {results['completed']}  "
        f"errors {results['errors'] or 'none'}" + (f"  cut at the run's end {cut}" if cut else "")
    ]
    if latency:
        lines += _latency_lines(results)
    return "\n".join(lines + _cost_lines(results))


def _latency_lines(results: Mapping[str, Any]) -> list[str]:
    lines = [
        f"wall {results['wall_s']} s  {results['throughput_rps']} req/s",
        "",
        f"{'latency (ms)':16}{'n':>7}{'p50':>9}{'p90':>9}{'p95':>9}{'p99':>9}{'max':>9}",
    ]
    latency = results["latency_ms"]
    for name, row in [("all", latency["all"]), *latency["by_layer"].items()]:
        lines.append(_latency_row(name, row))
    if results.get("ttft_ms"):
        lines.append(_latency_row("TTFT (stream)", results["ttft_ms"]["all"]))
    # the requests the rows above leave out: those that ended in an error, and those still
    # running at the run's deadline (the time they had run: a lower bound)
    if results.get("failed_ms"):
        lines.append(_latency_row("failed", results["failed_ms"]["all"]))
    if results.get("cut_at_deadline_ms"):
        lines.append(_latency_row("cut at deadline", results["cut_at_deadline_ms"]))
    return lines


def _latency_row(name: str, row: Mapping[str, Any]) -> str:
    if not row["n"]:  # no sample: no latency (its JSON zeros are not times a request took)
        return f"{name:16}{0:>7}" + "".join(f"{'-':>9}" for _ in range(5))
    return (
        f"{name:16}{row['n']:>7}{row['p50']:>9.1f}{row['p90']:>9.1f}{row['p95']:>9.1f}"
        f"{row['p99']:>9.1f}{row['max']:>9.1f}"
    )


def _cost_lines(results: Mapping[str, Any]) -> list[str]:
    cost = results["cost"]
    lines = [
        "",
        f"{'layer':16}{'requests':>9}{'hit rate':>10}{'cost':>13}{'baseline':>13}{'saved':>13}",
    ]
    rates = results["hit_rate"]
    for layer, row in cost["by_layer"].items():
        lines.append(
            f"{layer:16}{row['requests']:>9}{rates.get(layer, 0.0):>10.1%}"
            f"{_usd(row['cost_nanos']):>13}{_usd(row['baseline_nanos']):>13}"
            f"{_usd(row['saved_nanos']):>13}"
        )
    errored = cost["errored"]["requests"]
    billed = cost["billed"]
    if errored:  # billed for what their model calls produced: not in the responses' figures
        spent = _usd(billed["errored_cost_nanos"]) if billed else "unknown"
        lines.append(f"{'ended in error':16}{errored:>9}{'':>10}{spent:>13}")
    lines.append(
        f"{'total':16}{results['completed']:>9}{'':>10}{_usd(cost['cost_nanos']):>13}"
        f"{_usd(cost['baseline_nanos']):>13}{_usd(cost['saved_nanos']):>13}"
        + (  # no request completed: a share of nothing is no figure
            f"  ({cost['saved_fraction']:.1%} saved"
            + (" on the completed requests only)" if errored else ")")
            if results["completed"]
            else "  (no completed request: no saving to tell)"
        )
    )
    if billed:
        lines.append(  # its count is the stack's model calls (retries, cut calls), not requests
            f"{'billed (stack)':16}{'':>9}{'':>10}"
            f"{_usd(billed['cost_nanos']):>13}{_usd(billed['baseline_nanos']):>13}"
            f"{_usd(billed['saved_nanos']):>13}  "
            + (
                f"({billed['saved_fraction']:.1%} saved over {billed['model_requests']} model "
                "calls: the run's, as the stack billed it)"
                if billed["cost_nanos"] or billed["baseline_nanos"]
                else "(nothing billed: no share saved to tell)"  # not "0.0% saved" of nothing
            )
        )
    tokens = results["tokens"]
    lines.append(
        f"prefix cache: {tokens['cache_read']} tokens read, {tokens['cache_write']} written; "
        f"L1 exact {rates['semantic_cache_exact']:.1%}, paraphrase "
        f"{rates['semantic_cache_paraphrase']:.1%}; KV reused {tokens['kv_cached']} tokens"
    )
    labels = results.get("labels")
    if labels:
        lines.append(
            f"labelled L1 hits: {labels['l1_hits_judged']} judged, {labels['correct']} correct, "
            f"{labels['wrong']} wrong ({labels['wrong_labelled']} on labelled negative pairs); "
            f"saved excluding wrong hits {_usd(labels['saved_nanos_excluding_wrong'])}"
        )
    if cost["estimated"]:
        lines.append(
            f"({cost['estimated']} costs estimated: prefix-cache had not billed them as the answer "
            "went: down, or slower than the request's deadline left; the exact bill follows)"
        )
    return lines


@contextmanager
def replacing(path: Path) -> Iterator[TextIO]:
    """Writes ``path`` whole or not at all: into a file beside it, renamed over it once
    written (a Ctrl-C or a full disk mid-write leaves the file as it was)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("w", encoding="utf-8") as out:
            yield out
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
