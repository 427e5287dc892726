"""A self-contained HTML page of inline SVG charts (no dependency): latency percentiles per
layer and cost per layer against the baseline, one pair of charts per run."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

_COLOURS = {"p50": "#4c78a8", "p90": "#72b7b2", "p95": "#f58518", "p99": "#e45756"}
_COST = {"cost": "#4c78a8", "baseline": "#bab0ac"}
_ROW, _LABEL_W, _BAR_W = 14, 150, 420


def _bars(title: str, rows: Sequence[tuple[str, Mapping[str, float]]], colours: Mapping[str, str],
          unit: str) -> str:  # fmt: skip
    top = max((v for _, values in rows for v in values.values()), default=0.0) or 1.0
    height = 30 + sum(len(values) * _ROW + 8 for _, values in rows) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_LABEL_W + _BAR_W + 110}" '
        f'height="{height}" font-family="sans-serif" font-size="11">',
        f'<text x="0" y="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    y = 26
    for label, values in rows:
        parts.append(f'<text x="0" y="{y + 10}">{html.escape(label)}</text>')
        for name, value in values.items():
            width = max(1.0, value / top * _BAR_W)
            parts.append(
                f'<rect x="{_LABEL_W}" y="{y}" width="{width:.1f}" height="{_ROW - 2}" '
                f'fill="{colours[name]}"><title>{name}: {value:.3f} {unit}</title></rect>'
                f'<text x="{_LABEL_W + width + 4:.1f}" y="{y + 10}">{name} {value:,.3f} {unit}'
                "</text>"
            )
            y += _ROW
        y += 8
    parts.append("</svg>")
    return "".join(parts)


def run_charts(label: str, results: Mapping[str, Any]) -> str:
    latency = results["latency_ms"]
    rows = [("all", latency["all"]), *latency["by_layer"].items()]
    lat = _bars(
        f"{label}: latency percentiles (ms)",
        [(name, {q: float(row[q]) for q in _COLOURS}) for name, row in rows if row["n"]],
        _COLOURS,
        "ms",
    )
    layers = results["cost"]["by_layer"]
    cost = _bars(
        f"{label}: cost per layer vs no-cache baseline (USD)",
        [
            (name, {"cost": row["cost_nanos"] / 1e9, "baseline": row["baseline_nanos"] / 1e9})
            for name, row in layers.items()
        ],
        _COST,
        "$",
    )
    return f"<section><h2>{html.escape(label)}</h2>{lat}<br>{cost}</section>"


def render_html(
    title: str, runs: Sequence[tuple[str, Mapping[str, Any]]], summary: object = None
) -> str:
    """``summary`` (any JSON-able value, e.g. the bench's ratios) is shown above the charts."""
    body = "".join(run_charts(label, results) for label, results in runs)
    if summary is not None:
        text = html.escape(json.dumps(summary, indent=1))
        body = f"<h2>summary</h2><pre style='font-size:11px'>{text}</pre>{body}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "</head><body style='font-family:sans-serif'>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
