"""From samples to the report's ``results`` section (see SCHEMA.md): pure functions."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cachemesh.loadtest.samples import CUT, ERROR, INTERRUPTED, LOST, Sample

LAYER_ORDER = ("semantic_cache", "prefix_cache", "model")
QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int]:
    out: dict[str, float | int] = {"n": len(seconds)}
    for name, q in QUANTILES.items():
        out[name] = round(percentile(seconds, q) * 1000, 3)
    out["max"] = round(max(seconds, default=0.0) * 1000, 3)
    out["mean"] = round(sum(seconds) / len(seconds) * 1000, 3) if seconds else 0.0
    return out


def _by_layer(samples: Iterable[Sample], value: str) -> dict[str, Any]:
    groups: dict[str, list[float]] = defaultdict(list)
    everything: list[float] = []
    for s in samples:
        v = getattr(s, value)
        if v is None:
            continue
        groups[s.layer].append(v)
        everything.append(v)
    return {
        "all": latency_summary(everything),
        "by_layer": {layer: latency_summary(groups[layer]) for layer in _layers(groups)},
    }


def _layers(present: Iterable[str]) -> list[str]:
    found = set(present)
    return [x for x in LAYER_ORDER if x in found] + sorted(found - set(LAYER_ORDER))


def summarise(
    samples: Sequence[Sample], labels: Mapping[frozenset[str], int], wall_s: float | None = None
) -> dict[str, Any]:
    """``samples`` includes the warm-up ones: they teach which answer came from which question."""
    measured = [s for s in samples if not s.warmup]
    ok = [s for s in measured if s.layer != ERROR]
    cut_s = [s.latency_s for s in measured if s.code == CUT]  # the run's own cuts at its end
    if wall_s is None:
        timed = [s for s in measured if s.code != LOST]  # a lost process's have no time
        wall_s = (
            max(s.started_s + s.latency_s for s in timed) - min(s.started_s for s in timed)
            if timed
            else 0.0
        )
    served = Counter(s.layer for s in ok)
    streamed = any(s.ttft_s is not None for s in ok)
    return {
        "requests": len(measured),
        "completed": len(ok),
        # how requests failed: the Gateway's status names and the client's own faults, not
        # the run's own cuts at its end (``cut_at_deadline``)
        "errors": dict(
            sorted(Counter(s.code for s in measured if s.layer == ERROR and s.code != CUT).items())
        ),
        "cut_at_deadline": len(cut_s),
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(ok) / wall_s, 2) if wall_s > 0 else 0.0,
        "latency_ms": _by_layer(ok, "latency_s"),
        # still running at the end of the run's grace, cut then: the time each had run, a
        # lower bound of its latency (the completed ones' percentiles above leave them out)
        "cut_at_deadline_ms": latency_summary(cut_s) if cut_s else None,
        # ended in an error (DEADLINE_EXCEEDED at --timeout, UNAVAILABLE, ...): the time each
        # took to fail, apart from the completed ones' (a run whose slow tail timed out shows it)
        "failed_ms": _failed(measured),
        "ttft_ms": _by_layer(ok, "ttft_s") if streamed else None,
        "served_by": {layer: served[layer] for layer in _layers(served)},
        "hit_rate": _hit_rates(ok),
        "by_kind": _by_kind(ok),
        "tokens": _tokens(ok),
        "cost": _cost(ok, errored=len(measured) - len(ok)),
        "labels": _labels(samples, ok, labels) if labels else None,
    }


def _failed(measured: Sequence[Sample]) -> dict[str, Any] | None:
    """The requests that ended in an error, ``all`` and ``by_code``; None when none did. Those
    cut at the run's deadline or interrupted have their own figure or none (their time is a
    lower bound, not how long they took to fail); a lost process's have no time."""
    groups: dict[str, list[float]] = defaultdict(list)
    for s in measured:
        if s.layer == ERROR and s.code not in (CUT, INTERRUPTED, LOST):
            groups[s.code].append(s.latency_s)
    if not groups:
        return None
    return {
        "all": latency_summary([v for values in groups.values() for v in values]),
        "by_code": {code: latency_summary(groups[code]) for code in sorted(groups)},
    }


def _hit_rates(ok: Sequence[Sample]) -> dict[str, float]:
    n = len(ok) or 1
    l1 = [s for s in ok if s.layer == "semantic_cache"]
    return {
        "semantic_cache": round(len(l1) / n, 4),
        "semantic_cache_exact": round(sum(s.exact for s in l1) / n, 4),
        "semantic_cache_paraphrase": round(sum(not s.exact for s in l1) / n, 4),
        "prefix_cache": round(sum(s.layer == "prefix_cache" for s in ok) / n, 4),
        "model": round(sum(s.layer == "model" for s in ok) / n, 4),
    }


def _by_kind(ok: Sequence[Sample]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for s in ok:
        out[s.kind][s.layer] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(out.items())}


def _tokens(ok: Sequence[Sample]) -> dict[str, int]:
    return {
        "input": sum(s.input_tokens for s in ok),
        "cache_read": sum(s.cache_read_tokens for s in ok),
        "cache_write": sum(s.cache_write_tokens for s in ok),
        "output": sum(s.output_tokens for s in ok),
        "kv_cached": sum(s.kv_cached_tokens for s in ok),
    }


def _cost(ok: Sequence[Sample], errored: int) -> dict[str, Any]:
    """The completed requests' cost, as their responses gave it. A request that ended in an
    error has no cost the client can see, yet a model call cut after its prefill (its deadline,
    a cancel, the run's cut at its end) is billed for what it produced: ``errored`` counts
    them (those cut too: no answer tells their cost either), and ``billed`` is the
    run's spend as the stack billed it, when the caller could read it (None here)."""
    cost = sum(s.cost_nanos for s in ok)
    base = sum(s.baseline_nanos for s in ok)
    layers: dict[str, dict[str, int]] = {}
    for layer in _layers(s.layer for s in ok):
        rows = [s for s in ok if s.layer == layer]
        c, b = sum(s.cost_nanos for s in rows), sum(s.baseline_nanos for s in rows)
        layers[layer] = {
            "requests": len(rows),
            "cost_nanos": c,
            "baseline_nanos": b,
            "saved_nanos": b - c,
        }
    return {
        "cost_nanos": cost,
        "baseline_nanos": base,
        "saved_nanos": base - cost,
        "saved_fraction": round(1 - cost / base, 4) if base else 0.0,
        "estimated": sum(s.estimated for s in ok),
        "by_layer": layers,
        "errored": {"requests": errored},
        "billed": None,
    }


def _labels(
    everything: Sequence[Sample], ok: Sequence[Sample], labels: Mapping[frozenset[str], int]
) -> dict[str, Any]:
    """Judges each L1 hit of a labelled request by the question its answer was made for."""
    source: dict[str, str] = {}
    for s in everything:
        if s.question and s.layer in ("prefix_cache", "model"):
            source.setdefault(s.answer_digest, s.question)
    counts: Counter[str] = Counter()
    wrong_saved = 0
    for s in ok:
        if not s.question or s.layer != "semantic_cache":
            continue
        origin = source.get(s.answer_digest)
        if s.exact or origin == s.question:
            verdict = "correct"
        elif origin is None:
            verdict = "unknown_source"
        else:
            label = labels.get(frozenset((s.question, origin)), -1)
            verdict = {1: "correct", 0: "wrong_labelled"}.get(label, "wrong_unlabelled")
        counts[verdict] += 1
        if verdict.startswith("wrong"):
            wrong_saved += s.baseline_nanos - s.cost_nanos
    saved = sum(s.baseline_nanos - s.cost_nanos for s in ok)
    return {
        "l1_hits_judged": sum(counts.values()),
        "correct": counts["correct"],
        "wrong": counts["wrong_labelled"] + counts["wrong_unlabelled"],
        "wrong_labelled": counts["wrong_labelled"],
        "wrong_unlabelled": counts["wrong_unlabelled"],
        "unknown_source": counts["unknown_source"],
        "wrong_saved_nanos": wrong_saved,
        "saved_nanos_excluding_wrong": saved - wrong_saved,
    }
