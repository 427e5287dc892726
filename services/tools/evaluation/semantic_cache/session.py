"""Loads files and their cached vectors once; fits, calibrates and evaluates over them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.semantic_cache.embedder import MiniLMEmbedder, load_minilm_embedder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.query import normalise
from services.semantic_cache.verifier import WEIGHTS_PATH, Verifier, VerifierWeights
from services.tools.evaluation.semantic_cache.align import compare
from services.tools.evaluation.semantic_cache.calibrate import (
    MUST_REFUSE,
    MUST_SERVE,
    Calibration,
    Point,
    calibrate,
)
from services.tools.evaluation.semantic_cache.datasets import Half, PairsFile, load_pairs
from services.tools.evaluation.semantic_cache.fit import fit
from services.tools.evaluation.semantic_cache.protocols import Candidates, pairwise, retrieval
from services.tools.evaluation.semantic_cache.report import (
    probability_fn,
    protocol_report,
    verifier_latency_us,
)
from services.tools.evaluation.semantic_cache.vectors import VectorTable, embed_cached


class Session:
    def __init__(self, data_dir: Path, cache_dir: Path) -> None:
        self._data_dir, self._cache_dir = data_dir, cache_dir
        self._embedder: MiniLMEmbedder | None = None
        self._files: dict[str, tuple[PairsFile, VectorTable]] = {}

    @property
    def embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:
            self._embedder = load_minilm_embedder(threads=1)
        return self._embedder

    def load(self, name: str) -> tuple[PairsFile, VectorTable]:
        if name not in self._files:
            data = load_pairs(self._data_dir / name)
            texts = [t for p in data.pairs for t in (p.first, p.second)]
            self._files[name] = (data, embed_cached(self.embedder, texts, self._cache_dir))
        return self._files[name]

    def fit_verifier(self, names: Sequence[str]) -> Path:
        loaded = [self.load(n) for n in names]
        weights = fit([d for d, _ in loaded], [t for _, t in loaded])
        WEIGHTS_PATH.write_text(weights.to_json(), encoding="utf-8")
        return WEIGHTS_PATH

    def align(self, name: str) -> dict[str, object]:
        """The token-alignment check on the file's report half (``align.py``)."""
        data, table = self.load(name)
        return {
            "file": data.name,
            "half": "report",
            **compare(self.embedder, data.half("report"), table),
        }

    def candidates(self, name: str, half: Half, verifier: Verifier) -> Candidates:
        data, table = self.load(name)
        protocol = retrieval if data.all_positive else pairwise
        return protocol(data.half(half), table, probability_fn(verifier))

    def calibrate(
        self, names: Sequence[str], target: float, min_threshold: float
    ) -> tuple[Calibration, Calibration]:
        verifier = Verifier(VerifierWeights.load(), 0.0)
        sets = {n: self.candidates(n, "fit", verifier) for n in names}
        probes = self._probes(verifier)

        def probes_ok(point: Point) -> bool:
            return all(
                ok == (cos >= point.threshold and prob >= point.min_probability)
                for ok, cos, prob in probes
            )

        return (
            calibrate(sets, target, probes_ok, min_threshold=min_threshold),
            calibrate(sets, target, probes_ok, verifier=False, min_threshold=min_threshold),
        )

    def evaluate(self, names: Sequence[str]) -> dict[str, object]:
        shipped = OperatingPoint.load()
        weights = VerifierWeights.load()
        verifier = Verifier(weights, shipped.min_probability)
        point = Point(shipped.threshold, shipped.min_probability, shipped.margin)
        files: dict[str, object] = {}
        summary: dict[str, object] = {}
        for name in names:
            data, table = self.load(name)
            protocols: dict[str, object] = {}
            kinds = (
                (("retrieval", retrieval),)
                if data.all_positive
                else (("pairwise", pairwise), ("retrieval", retrieval))
            )
            for kind, protocol in kinds:
                started = time.monotonic()
                fit_c = protocol(data.half("fit"), table, probability_fn(verifier))
                report_c = protocol(data.half("report"), table, probability_fn(verifier))
                protocols[kind] = protocol_report(fit_c, report_c, point)
                protocols[kind]["seconds"] = round(time.monotonic() - started, 1)  # type: ignore[index]
                summary[f"{data.name}/{kind}"] = _summary(protocols[kind])
            files[data.name] = {
                "pairs": len(data.pairs),
                "report_half_pairs": len(data.half("report")),
                "fit_half_pairs": len(data.half("fit")),
                "protocols": protocols,
            }
        sample = [
            (normalise(p.first), normalise(p.second)) for p in self.load(names[0])[0].pairs[:500]
        ]
        return {
            "embedder": self.embedder.version,
            "operating_point": {**point.as_dict(), "provenance": shipped.provenance},
            "verifier": {
                "provenance": weights.provenance,
                "latency_us_per_candidate": round(verifier_latency_us(verifier, sample), 1),
            },
            "probes": self._probe_report(verifier, point),
            "summary": summary,
            "files": files,
        }

    def _probes(self, verifier: Verifier) -> list[tuple[bool, float, float]]:
        cases = [(True, a, b) for a, b in MUST_SERVE] + [(False, a, b) for a, b in MUST_REFUSE]
        out = []
        for ok, a, b in cases:
            va, vb = self.embedder.embed([a, b])
            cos = float(np.dot(va, vb))
            out.append((ok, cos, verifier.probability(normalise(a), normalise(b), cos)))
        return out

    def _probe_report(self, verifier: Verifier, point: Point) -> list[dict[str, object]]:
        cases = list(MUST_SERVE) + list(MUST_REFUSE)
        return [
            {
                "cached": a,
                "query": b,
                "must_serve": ok,
                "cosine": round(cos, 4),
                "verifier_probability": round(prob, 4),
                "served": cos >= point.threshold and prob >= point.min_probability,
            }
            for (a, b), (ok, cos, prob) in zip(cases, self._probes(verifier), strict=True)
        ]


def _summary(section: object) -> dict[str, object]:
    assert isinstance(section, dict)
    return {
        "shipped": section["shipped"],
        "baseline_at_equal_recall": section["baseline_at_equal_recall"],
        "halved": [c["wrong_hits_halved"] for c in section["at_equal_recall"]],
    }
