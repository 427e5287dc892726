"""The cross-encoder's logits for the harness, kept on disk outside git (``.cache/``).

Scoring every candidate pair of every file takes minutes; the logits depend only on the two
texts and the graph, so they are kept per graph version (its sha256 prefix) and computed once.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.semantic_cache.cross_encoder import F32, PairScorer

BATCH = 256


def _key(first: str, second: str) -> str:
    return hashlib.sha1(f"{first}\0{second}".encode()).hexdigest()


class CachedScorer:
    """A ``PairScorer`` that remembers every logit it computed, per graph version."""

    def __init__(self, scorer: PairScorer, cache_dir: Path) -> None:
        self._scorer = scorer
        self._path = cache_dir / f"cross-encoder-{scorer.version.replace('@', '-')}.json"
        self._known: dict[str, float] = {}
        if self._path.is_file():
            self._known = {str(k): float(v) for k, v in json.loads(self._path.read_text()).items()}

    @property
    def version(self) -> str:
        return self._scorer.version

    def logits(self, pairs: Sequence[tuple[str, str]]) -> F32:
        keys = [_key(a, b) for a, b in pairs]
        missing = sorted(
            {k: p for k, p in zip(keys, pairs, strict=True) if k not in self._known}.items()
        )
        started = time.monotonic()
        for start in range(0, len(missing), BATCH):
            chunk = missing[start : start + BATCH]
            values = self._scorer.logits([p for _, p in chunk])
            self._known.update(zip([k for k, _ in chunk], values.tolist(), strict=True))
            if len(missing) > BATCH and start // BATCH % 20 == 0:
                done = start + len(chunk)
                rate = done / max(time.monotonic() - started, 1e-9)
                print(f"  cross-encoder {done}/{len(missing)} ({rate:.0f}/s)", file=sys.stderr)
        if missing:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            partial = self._path.with_suffix(".partial")
            partial.write_text(json.dumps(self._known))
            partial.replace(self._path)
        return np.array([self._known[k] for k in keys], dtype=np.float32)
