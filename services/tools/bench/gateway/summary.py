"""The bench's terminal summary: references, each case against its reference, the cost of
exporting traces and the CPU per request of each service (pure: from the report's sections)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.tools.bench.gateway.http_path import CASE as HTTP_CASE
from services.tools.bench.gateway.runs import AGENT, EXACT, MIXED, SEMANTIC, UNRELATED

TITLES = {
    EXACT: "(a) exact L1 hits",
    SEMANTIC: "(b) semantic L1 hits",
    AGENT: "(c) agent misses, sim 0",
    UNRELATED: "(c2) unrelated misses, sim 0",
}


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _references(references: Mapping[str, Any]) -> list[str]:
    lines = ["references (req/s, p50 ms)"]
    chains = [("echo two hops", references["echo_two_hops"])]
    chains += [(f"echo miss chain, {k}", v) for k, v in references["echo_miss_chain"].items()]
    for name, ref in chains:
        chain = ref["chain"]
        levels = "  ".join(
            f"x{r['concurrency']} {r['throughput_rps']:,.0f}/s {r['latency_ms']['p50']:.1f}"
            for r in ref["levels"]
        )
        calls = chain["downstream_calls"]
        shape = f"{calls} call{'s' if calls > 1 else ''}, {chain['request_bytes']:,} B"
        lines.append(f"  {name:28} {shape:18}  {levels}")
    embedder = references["embedder"]
    lines.append(
        f"  embedder: one sentence p50 {embedder['single']['latency_ms']['p50']:.1f} ms "
        f"({embedder['single']['sentences_per_s']:,.0f}/s); batches of "
        f"{embedder['batched']['batch']}: {embedder['batched']['sentences_per_s']:,.0f}/s"
    )
    return lines


def _cases(ratios: Mapping[str, Any]) -> list[str]:
    head = (
        f"{'case':30}{'x':>3}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}  "
        f"{'÷ echo: req/s':>13}{'p50':>7}{'p99':>7}  echo"
    )
    lines = [head]
    for case, title in TITLES.items():
        rows = ratios[case]
        if not isinstance(rows, list):
            lines.append(f"{title:30} skipped: {rows['skipped']}")
            continue
        for row in rows:
            errors = f"  errors {row['errors']}" if row["errors"] else ""
            lines.append(
                f"{title:30}{row['concurrency']:>3}{row['throughput_rps']:>8.1f}"
                f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}  "
                f"{_num(row['throughput_vs_echo'], 3):>13}{_num(row['p50_vs_echo'], 1):>7}"
                f"{_num(row['p99_vs_echo'], 1):>7}  {row['echo']}{errors}"
            )
    for row in ratios[SEMANTIC]:
        lines.append(
            f"(b) x{row['concurrency']}: p50 {_num(row['p50_vs_embedder_single'])}x one "
            f"embedding; req/s {_num(row['throughput_vs_embedder_batched'])}x the batched embedder"
        )
    mixed = ratios[MIXED]
    lines.append(
        f"(d) mixed, 8 in flight: {mixed['saved_fraction']:.1%} saved, L1 hits "
        f"{mixed['hit_rate']['semantic_cache']:.1%}, L2 {mixed['hit_rate']['prefix_cache']:.1%}, "
        f"{mixed['throughput_rps']:.1f} req/s, wrong L1 hits {mixed['wrong_l1_hits']}"
    )
    return lines


def _tracing(tracing: Mapping[str, Any]) -> list[str]:
    if "skipped" in tracing:
        return [f"tracing: skipped: {tracing['skipped']}"]
    services = ", ".join(f"{k} {v}" for k, v in tracing["by_service"].items())
    lines = [
        f"tracing: export to a real OTLP receiver on ÷ off; spans received "
        f"{tracing['spans_received']:,} ({_num(tracing['spans_per_request'], 1)} a request: "
        f"{services})",
        f"{'':30}{'x':>3}{'req/s off':>10}{'on':>8}{'on÷off':>8}"
        f"{'p50 off':>9}{'on':>7}{'CPU ms/req off':>16}{'on':>7}",
    ]
    for case in (EXACT, AGENT):
        for row in tracing[case]:
            lines.append(
                f"{TITLES[case]:30}{row['concurrency']:>3}{row['throughput_rps_off']:>10.1f}"
                f"{row['throughput_rps_on']:>8.1f}{_num(row['throughput_on_vs_off'], 3):>8}"
                f"{row['p50_ms_off']:>9.1f}{row['p50_ms_on']:>7.1f}"
                f"{_num(row.get('cpu_ms_per_request_off')):>16}"
                f"{_num(row.get('cpu_ms_per_request_on')):>7}"
            )
    return lines


def _cpu(title: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [r for r in rows if "cpu_ms_per_request" in r]
    if not rows:
        return []
    services = list(rows[0]["cpu_ms_per_request"])
    lines = [f"CPU ms per request, {title}", f"  {'service':16}" + "".join(
        f"{'x' + str(r['concurrency']):>9}" for r in rows)]  # fmt: skip
    for service in services:
        lines.append(
            f"  {service:16}"
            + "".join(f"{_num(r['cpu_ms_per_request'][service]):>9}" for r in rows)
        )
    return lines


def _failed(name: str, row: Mapping[str, Any]) -> str:
    """``name``'s errors and the requests cut at its run's bound (a bound a working stack
    never reaches, ``measure.DURATION_S``: the load test counts them apart from the errors);
    "" when neither."""
    parts = [f"errors {dict(row['errors'])}"] if row["errors"] else []
    if cut := row.get("cut_at_deadline"):  # absent from an older report's rows
        parts.append(f"{cut} cut at the run's bound")
    return f"{name}: {'; '.join(parts)}" if parts else ""


def failed_points(results: Mapping[str, Any]) -> list[str]:
    """Each measured point with requests that ended in an error (or were cut at the run's
    bound), named with its codes: its
    req/s counts the completed ones only and its latency leaves the failed out, so its figure
    is not the case's (a stack that refused every request shows 0.0 req/s, ratio 0.000).
    Empty when every point's requests completed."""
    points: list[tuple[str, Mapping[str, Any]]] = []
    for case, title in TITLES.items():
        rows = results["cases"].get(case)
        if isinstance(rows, list):
            points += [(f"{title} x{r['concurrency']}", r) for r in rows]
    for case, rows in results["tracing"].get("on", {}).items():
        points += [(f"{TITLES[case]}, traced, x{r['concurrency']}", r) for r in rows]
    mixed = results["cases"].get(MIXED)
    if isinstance(mixed, Mapping) and "errors" in mixed:
        points.append(("(d) mixed x8", mixed))
    out = [said for name, row in points if (said := _failed(name, row))]
    http = results["cases"].get(HTTP_CASE)
    for part in ("exact_hits", "misses") if isinstance(http, Mapping) else ():
        for row in http.get(part, []):
            for path in ("grpc", "http"):
                if row[path]["errors"]:
                    out.append(
                        f"(e) {part} {path} x{row['concurrency']}: {row[path]['errors']} errors"
                    )
    return out


def render(references: Mapping[str, Any], ratios: Mapping[str, Any]) -> str:
    lines = [*_references(references), "", *_cases(ratios), "", *_tracing(ratios["tracing"])]
    for case in (AGENT, UNRELATED):
        if isinstance(ratios[case], list):
            lines += ["", *_cpu(TITLES[case], ratios[case])]
    return "\n".join(lines)
