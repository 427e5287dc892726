"""A caller that builds many offline stacks (make bench-router: 30 in its default run) hands
each the cross-encoder it loaded once: no stack loads its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.clock import ManualClock
from services.semantic_cache import wiring
from services.semantic_cache.cross_encoder import load_cross_encoder
from services.tools.estimator.offline import OfflineStack
from services.tools.stack.lifecycle import Stack
from tests.unit.semantic_cache_support import FakeEmbedder

ROOT = Path(__file__).resolve().parents[2]


def test_a_handed_in_cross_encoder_is_the_verifiers_and_none_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = load_cross_encoder(threads=1)
    loaded: list[int] = []

    def load(*args: object, **kwargs: object) -> object:
        loaded.append(1)
        return scorer

    monkeypatch.setattr(wiring, "load_cross_encoder", load)
    settings = Stack(ROOT, environ={}).settings()
    stacks = [
        OfflineStack(settings, ManualClock(), embedder=FakeEmbedder(), cross_encoder=scorer)
        for _ in range(2)
    ]
    for stack in stacks:
        verifier = stack.semantic_cache._verifier
        assert verifier is not None and verifier.cross_encoder is scorer
    assert loaded == []
    OfflineStack(settings, ManualClock(), embedder=FakeEmbedder())  # none handed in: loaded
    assert loaded == [1]
