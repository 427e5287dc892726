"""Loads files and their cached vectors once; fits, calibrates and evaluates over them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.semantic_cache.cross_encoder import OnnxCrossEncoder, load_cross_encoder
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
from services.tools.evaluation.semantic_cache.datasets import Pair, PairsFile, load_pairs
from services.tools.evaluation.semantic_cache.fit import DEFAULT_FEATURES, LICENSED_FOR_FITTING, fit
from services.tools.evaluation.semantic_cache.protocols import Candidates, pairwise, retrieval
from services.tools.evaluation.semantic_cache.report import (
    by_category,
    probability_fn,
    protocol_report,
    verifier_latency_us,
)
from services.tools.evaluation.semantic_cache.scores import CachedScorer
from services.tools.evaluation.semantic_cache.vectors import VectorTable, embed_cached
from services.tools.verifier.near_misses import NAME as GENERATED
from services.tools.verifier.near_misses import generate
from services.tools.verifier.splits import slice_of

# Candidates below this cosine are never scored by the verifier (never served by it): the
# shipped threshold's floor is 0.85 and the report's curve starts at 0.80.
EVAL_FLOOR = 0.80
Part = str  # "fit" | "report" (the halves) | "train" | "tune" (the fit half's slices)


def part_of(data: PairsFile, part: Part) -> tuple[Pair, ...]:
    if part in ("fit", "report"):
        return data.half("fit" if part == "fit" else "report")
    if part in ("train", "tune"):
        return tuple(p for p in data.pairs if slice_of(p.first) == part)
    raise ValueError(f"unknown part {part!r}")


def generated_file() -> PairsFile:
    """The generated near-misses and rewrites (``near_misses.py``), as a labelled file."""
    pairs = tuple(Pair(p.first, p.second, p.label) for p in generate())
    return PairsFile(GENERATED, pairs, all_positive=False)


class Session:
    def __init__(self, data_dir: Path, cache_dir: Path) -> None:
        self._data_dir, self._cache_dir = data_dir, cache_dir
        self._embedder: MiniLMEmbedder | None = None
        self._files: dict[str, tuple[PairsFile, VectorTable]] = {}
        self._cross_encoder: OnnxCrossEncoder | None = None
        self._scorer: CachedScorer | None = None

    @property
    def embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:
            self._embedder = load_minilm_embedder(threads=1)
        return self._embedder

    @property
    def cross_encoder(self) -> OnnxCrossEncoder:
        if self._cross_encoder is None:
            self._cross_encoder = load_cross_encoder(threads=1)
        return self._cross_encoder

    @property
    def scorer(self) -> CachedScorer:
        if self._scorer is None:
            self._scorer = CachedScorer(self.cross_encoder, self._cache_dir)
        return self._scorer

    def verifier(self, min_probability: float, weights: VerifierWeights | None = None) -> Verifier:
        """The shipped (or given) weights, the cross-encoder's logits from the disk cache, the
        embedder for the parts of two questions that differ after a shared opening (as the
        service's)."""
        weights = weights if weights is not None else VerifierWeights.load()
        scorer = self.scorer if weights.needs_cross_encoder else None
        return Verifier(weights, min_probability, scorer, embedder=self.embedder)

    def load(self, name: str) -> tuple[PairsFile, VectorTable]:
        if name not in self._files:
            data = generated_file() if name == GENERATED else load_pairs(self._data_dir / name)
            texts = [t for p in data.pairs for t in (p.first, p.second)]
            self._files[name] = (data, embed_cached(self.embedder, texts, self._cache_dir))
        return self._files[name]

    def fit_verifier(
        self,
        names: Sequence[str],
        features: Sequence[str] = DEFAULT_FEATURES,
        vetoes: Sequence[str] = (),
        path: Path = WEIGHTS_PATH,
    ) -> Path:
        loaded = [self.load(n) for n in names]
        scorer = self.scorer if "cross_encoder_logit" in features else None
        weights = fit(
            [d for d, _ in loaded], [t for _, t in loaded], scorer, features=features, vetoes=vetoes
        )
        path.write_text(weights.to_json(), encoding="utf-8")
        return path

    def align(self, name: str) -> dict[str, object]:
        """The token-alignment check on the file's report half (``align.py``)."""
        data, table = self.load(name)
        return {
            "file": data.name,
            "half": "report",
            **compare(self.embedder, data.half("report"), table),
        }

    def candidates(self, name: str, part: Part, verifier: Verifier) -> Candidates:
        data, table = self.load(name)
        protocol = retrieval if data.all_positive else pairwise
        return protocol(part_of(data, part), table, probability_fn(verifier, EVAL_FLOOR))

    def calibration_part(self, name: str) -> Part:
        """Files with negatives: the tune slice, pairwise (the cross-encoder never saw it).
        All-positive files (the mock data): the whole fit half, retrieval, since the tune slice
        alone (~125 queries) cannot show a precision of 0.99; the cross-encoder saw three
        quarters of it (its positives and each query's nearest other question), so its figure
        there is optimistic: the report half says by how much."""
        return "fit" if self.load(name)[0].all_positive else "tune"

    def tuning_part(self, name: str) -> Part:
        """Where per-file points are chosen: the calibration's part for the files the verifier
        was fitted on, the fit half for the others (Quora)."""
        data = self.load(name)[0]
        return self.calibration_part(name) if data.name in LICENSED_FOR_FITTING else "fit"

    def calibrate(
        self, names: Sequence[str], targets: dict[str, float], min_threshold: float
    ) -> tuple[Calibration, Calibration]:
        verifier = self.verifier(0.0)
        sets = {n: self.candidates(n, self.calibration_part(n), verifier) for n in names}
        probes = self._probes(verifier)

        def probes_ok(point: Point) -> bool:
            return all(
                ok == (cos >= point.threshold and prob >= point.min_probability)
                for ok, cos, prob in probes
            )

        return (
            calibrate(sets, targets, probes_ok, min_threshold=min_threshold),
            calibrate(sets, targets, probes_ok, verifier=False, min_threshold=min_threshold),
        )

    def evaluate(self, names: Sequence[str]) -> dict[str, object]:
        shipped = OperatingPoint.load()
        weights = VerifierWeights.load()
        verifier = self.verifier(shipped.min_probability, weights)
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
            scored = probability_fn(verifier, EVAL_FLOOR)
            for kind, protocol in kinds:
                started = time.monotonic()
                fit_c = protocol(part_of(data, self.tuning_part(name)), table, scored)
                report_c = protocol(data.half("report"), table, scored)
                protocols[kind] = protocol_report(fit_c, report_c, point)
                if data.name == GENERATED and kind == "pairwise":
                    protocols[kind]["by_category"] = by_category(  # type: ignore[index]
                        report_c, _categories(data.half("report")), point
                    )
                protocols[kind]["seconds"] = round(time.monotonic() - started, 1)  # type: ignore[index]
                summary[f"{data.name}/{kind}"] = _summary(protocols[kind])
            files[data.name] = {
                "pairs": len(data.pairs),
                "report_half_pairs": len(data.half("report")),
                "fit_half_pairs": len(data.half("fit")),
                "protocols": protocols,
            }
        sample = [
            (normalise(p.first), normalise(p.second)) for p in self.load(names[0])[0].pairs[:300]
        ]
        # timed without the harness's logit cache: one cross-encoder run per candidate
        live = Verifier(
            weights,
            shipped.min_probability,
            load_cross_encoder(threads=1) if weights.needs_cross_encoder else None,
        )
        return {
            "embedder": self.embedder.version,
            "operating_point": {**point.as_dict(), "provenance": shipped.provenance},
            "verifier": {
                "features": list(weights.features),
                "vetoes": list(weights.vetoes),
                "cross_encoder": None if live.cross_encoder is None else live.cross_encoder.version,
                "provenance": weights.provenance,
                "latency_us_per_candidate": round(verifier_latency_us(live, sample), 1),
                "latency_sample": f"first 300 pairs of {names[0]}, one thread",
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


def _categories(pairs: Sequence[Pair]) -> list[str]:
    known = {(p.first, p.second): p.category for p in generate()}
    return [known[(p.first, p.second)] for p in pairs]


def _summary(section: object) -> dict[str, object]:
    """The shipped setting against the plain embedding at equal recall (issue 12's figure:
    the verifier's wrong answers as a share of the plain embedding's)."""
    assert isinstance(section, dict)
    shipped, plain = section["shipped"], section["baseline_at_equal_recall"]
    return {
        "shipped": shipped,
        "baseline_at_equal_recall": plain,
        "wrong_vs_plain": round(shipped["wrong"] / max(plain["wrong"], 1), 3),
        "halved": [c["wrong_hits_halved"] for c in section["at_equal_recall"]],
    }
