"""The labelled prompts with their embeddings, shapes and prices, loaded once per command."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelSpec, ModelTable, load_model_table
from services.common.tokens import load_cl100k
from services.router.routing.features import shape_features
from services.router.tiering import choose_tier
from services.semantic_cache.embedder import load_minilm_embedder
from services.tools.evaluation.router.labels import Half, Row, load_rows, split
from services.tools.evaluation.semantic_cache.vectors import embed_cached

# The cost model's one assumption: every answer is this many output tokens on either tier.
OUTPUT_TOKENS = 64


@dataclass(frozen=True)
class Prompts:
    rows: list[Row]
    vectors: npt.NDArray[np.float32]
    shapes: npt.NDArray[np.float32]
    weak: npt.NDArray[np.bool_]
    strong: npt.NDArray[np.bool_]
    small_nanos: npt.NDArray[np.float64]  # each prompt's cost on the small model
    large_nanos: npt.NDArray[np.float64]
    tokens: npt.NDArray[np.float64]  # each prompt's tokens (cl100k)

    def nanos_on(self, spec: ModelSpec) -> npt.NDArray[np.float64]:
        """Each prompt's cost on ``spec`` (its tokens and OUTPUT_TOKENS at its prices)."""
        return _nanos(self.tokens, spec)

    @property
    def texts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    def cost_share(self, to_large: npt.NDArray[np.float64] | npt.NDArray[np.bool_]) -> float:
        """The routed set's cost over sending every prompt to the large model; ``to_large`` is
        how much of each prompt goes large (0 to 1: a share of a tie group)."""
        large = np.asarray(to_large, dtype=np.float64)
        cost = (large * self.large_nanos + (1.0 - large) * self.small_nanos).sum()
        return float(cost / self.large_nanos.sum())

    def rule_scores(self) -> npt.NDArray[np.float64]:
        """The rule of thumb (``tiering.choose_tier``) as a score: 1 = large, 0 = small."""
        out = []
        for text in self.texts:
            request = pb.CompleteRequest(
                model="auto",
                max_tokens=256,
                messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
            )
            out.append(1.0 if choose_tier(request).tier == "large" else 0.0)
        return np.array(out)


def _nanos(tokens: npt.NDArray[np.float64], spec: ModelSpec) -> npt.NDArray[np.float64]:
    """Each prompt's cost on ``spec``, a long prompt at the row's long-context prices."""
    return np.array([spec.baseline_nanos(int(n), OUTPUT_TOKENS) for n in tokens], dtype=np.float64)


class Session:
    def __init__(self, data: Path, cache_dir: Path) -> None:
        self.data = data
        self.cache_dir = cache_dir
        self.rows = load_rows(data)
        self.table: ModelTable = load_model_table()
        self._embedder = load_minilm_embedder(threads=2)
        self.embedder = self._embedder.version
        self._vectors = embed_cached(self._embedder, [r.prompt for r in self.rows], cache_dir)
        self._tokens = load_cl100k()

    def data_sha256(self) -> str:
        return hashlib.sha256(self.data.read_bytes()).hexdigest()

    def half(self, which: Half) -> Prompts:
        rows = split(self.rows, which)
        texts = [r.prompt for r in rows]
        small, large = self.table.for_tier("small"), self.table.for_tier("large")
        tokens = np.array([self._tokens.count(t) for t in texts], dtype=np.float64)
        return Prompts(
            rows=rows,
            vectors=self._vectors.of(texts),
            shapes=np.stack([shape_features(t) for t in texts]),
            weak=np.array([r.weak for r in rows]),
            strong=np.array([r.strong for r in rows]),
            small_nanos=_nanos(tokens, small),
            large_nanos=_nanos(tokens, large),
            tokens=tokens,
        )
