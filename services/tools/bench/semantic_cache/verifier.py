"""The verification step's cost per candidate (``make bench-cache``, section ``verifier``).

One candidate per call, as a lookup makes it (the nearest candidate; runners-up within the
ambiguity margin holding another answer join it in the same call, timed here as batches of 2):
the shipped weights with the shipped cross-encoder on onnxruntime at the service's one thread,
against the lexical features alone. Pairs: the first questions and second questions of the
generated near-misses (short, support-style questions) and of PAWS (long Wikipedia sentences).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.semantic_cache.cross_encoder import load_cross_encoder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.query import normalise
from services.semantic_cache.verifier import Verifier, VerifierWeights, features
from services.tools.evaluation.semantic_cache.datasets import load_pairs
from services.tools.verifier.near_misses import generate

SAMPLE = 300


def _times_us(run: Any, items: Sequence[Any]) -> dict[str, float]:
    """Wall-clock percentiles, and the process's CPU time per call (what a shared machine's
    other load does not inflate)."""
    samples = []
    cpu_started = time.process_time()
    for item in items:
        started = time.perf_counter()
        run(item)
        samples.append(1e6 * (time.perf_counter() - started))
    cpu_us = 1e6 * (time.process_time() - cpu_started) / max(len(items), 1)
    values = np.array(samples)
    return {
        "p50_us": round(float(np.percentile(values, 50)), 1),
        "p99_us": round(float(np.percentile(values, 99)), 1),
        "mean_us": round(float(values.mean()), 1),
        "cpu_us_per_call": round(cpu_us, 1),
        "calls": len(samples),
    }


def measure_verifier(data_dir: Path) -> dict[str, Any]:
    shipped = OperatingPoint.load()
    weights = VerifierWeights.load()
    scorer = load_cross_encoder(threads=1) if weights.needs_cross_encoder else None
    verifier = Verifier(weights, shipped.min_probability, scorer)
    sets = {
        "generated_near_misses": [(p.first, p.second) for p in generate()[:SAMPLE]],
        "paws_wiki_dev": [
            (p.first, p.second) for p in load_pairs(data_dir / "paws_wiki_dev.tsv").pairs[:SAMPLE]
        ],
    }
    out: dict[str, Any] = {
        "features": list(weights.features),
        "cross_encoder": None if scorer is None else scorer.version,
        "onnxruntime_threads": 1,
        "sets": {},
    }
    for name, raw in sets.items():
        pairs = [(normalise(a), normalise(b)) for a, b in raw]
        verifier.accepts_all([(a, b, 0.9) for a, b in pairs[:8]])  # the first runs allocate
        twos = [pairs[i : i + 2] for i in range(0, len(pairs) - 1, 2)]
        out["sets"][name] = {
            "per_candidate": _times_us(lambda p: verifier.accepts(p[0], p[1], 0.9), pairs),
            "two_candidates_one_call": _times_us(
                lambda two: verifier.accepts_all([(a, b, 0.9) for a, b in two]), twos
            ),
            "lexical_features_only": _times_us(lambda p: features(p[0], p[1], 0.9), pairs),
        }
    return out
