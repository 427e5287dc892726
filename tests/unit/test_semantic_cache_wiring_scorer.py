"""build_verifier uses the cross-encoder it is handed whenever one is handed (``is not None``),
not only when it is truthy: a scorer that is empty by ``len`` was replaced by a fresh load."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from services.common.env import Env
from services.semantic_cache import wiring
from services.semantic_cache.cross_encoder import F32
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.verifier import VerifierWeights

CONFIG = SemanticCacheSettings.from_env(Env({}), OperatingPoint.load())


class EmptyBatchScorer:
    """A scorer that counts pairs waiting in it: falsy while none wait."""

    version = "test"

    def __len__(self) -> int:
        return 0

    def logits(self, pairs: Sequence[tuple[str, str]]) -> F32:
        return np.zeros(len(pairs), dtype=np.float32)


def test_a_handed_in_scorer_is_used_even_when_it_is_falsy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert VerifierWeights.load().needs_cross_encoder  # else the scorer is not used at all

    def no_load(threads: int) -> object:
        raise AssertionError("loaded its own cross-encoder though one was handed in")

    monkeypatch.setattr(wiring, "load_cross_encoder", no_load)
    scorer = EmptyBatchScorer()
    assert wiring.build_verifier(CONFIG, cross_encoder=scorer).cross_encoder is scorer
