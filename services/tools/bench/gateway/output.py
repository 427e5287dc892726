"""The bench's report: one JSON document (SCHEMA.md, ``cachemesh.bench.v2``) and its chart."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cachemesh.loadtest import chart, report

SCHEMA = "cachemesh.bench.v2"


def document(
    *, run: Mapping[str, Any], workload: Mapping[str, Any], stack: Mapping[str, str],
    stacks: Mapping[str, Mapping[str, str]], results: Mapping[str, Any],
    ratios: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """``stack``: the settings every bench stack shares; ``stacks``: each one's own overrides
    (both already restricted to cachemesh's settings and masked:
    ``services.tools.bench.gateway.redact``)."""
    doc = report.document(run=run, workload=workload, stack=stack, results=results)
    doc["schema"] = SCHEMA
    doc["stacks"] = {name: dict(overrides) for name, overrides in stacks.items()}
    doc["ratios"] = dict(ratios)
    return doc


def write(
    doc: Mapping[str, Any], runs: Sequence[tuple[str, Mapping[str, Any]]], out_dir: Path, day: str
) -> Path:
    """Writes ``bench-<day>.json`` and ``bench-<day>.html`` (charts of ``runs``, the ratios
    above them) into ``out_dir``; returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench-{day}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    page = chart.render_html(f"cachemesh bench {day}", runs, doc["ratios"])
    out.with_suffix(".html").write_text(page)
    return out
