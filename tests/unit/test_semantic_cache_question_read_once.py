"""One Lookup verifies its shortlist in one batch against one new question: the question's side
of ``folding.folding_refusal`` (its composed form, folded key, quoted spans, indentation and
accented words) is made once for the batch, not again for every candidate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from services.semantic_cache import folding
from services.semantic_cache.folding import Forms
from tests.unit.test_semantic_cache_reading import verifier

ASKED = "How can I change the `--depth` of a git clone in my café's repo?"
SHORTLIST = (
    "How do I set the `--depth` of a git clone in my café's repo?",
    "What sets the `--depth` of a git clone for my café's repo?",
    "Can I change the `--depth` of a git clone of my café's repo?",
)


def _counted(monkeypatch: pytest.MonkeyPatch, name: str, made: Counter[tuple[str, str]]) -> None:
    forms: Callable[[str], Forms] = getattr(folding, name)

    def counted(text: str) -> Forms:
        made[(name, text)] += 1
        return forms(text)

    monkeypatch.setattr(folding, name, counted)


def test_the_new_questions_side_is_made_once_for_the_whole_shortlist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chosen = verifier()
    for cached in SHORTLIST:  # each pair reaches every form of the folding check
        assert not chosen.reader.read(cached, ASKED, cross_encoder=True, scored=True).refusal
    made: Counter[tuple[str, str]] = Counter()
    for name in ("_span_forms", "_indents", "_accented_forms"):
        _counted(monkeypatch, name, made)
    chosen.verdicts([(cached, ASKED, 0.9) for cached in SHORTLIST])
    for name in ("_span_forms", "_indents", "_accented_forms"):
        assert made[(name, ASKED)] == 1, name  # was once per candidate: 3
        assert all(made[(name, cached)] == 1 for cached in SHORTLIST), name
