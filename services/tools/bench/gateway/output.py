"""The bench's report: one JSON document (SCHEMA.md, ``cachemesh.bench.v2``) and its chart."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
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


def stamp(now: datetime) -> str:
    """A report's name part: the UTC date and time to the second (``2025-06-01T101500Z``)."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H%M%SZ")


def write(
    doc: Mapping[str, Any], runs: Sequence[tuple[str, Mapping[str, Any]]], out_dir: Path,
    when: str,
) -> Path:  # fmt: skip
    """Writes ``bench-<when>.json`` and ``bench-<when>.html`` (charts of ``runs``, the ratios
    above them) into ``out_dir``, never over an earlier run's (``bench-<when>-2.json`` then);
    returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        out = out_dir / (f"bench-{when}.json" if n == 1 else f"bench-{when}-{n}.json")
        try:
            with out.open("x") as file:  # claimed atomically: two runs never share a name
                file.write(json.dumps(doc, indent=2) + "\n")
            break
        except FileExistsError:
            continue
    page = chart.render_html(f"cachemesh bench {when}", runs, doc["ratios"])
    out.with_suffix(".html").write_text(page)
    return out
