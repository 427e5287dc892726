"""The verification step: its cross-checks, the shipped weights, and the cache applying it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.verifier import (
    FEATURES,
    Verifier,
    VerifierWeights,
    features,
    words,
)
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer, q


def shipped(min_probability: float | None = None) -> Verifier:
    """The shipped weights at the shipped setting (or at ``min_probability``)."""
    if min_probability is None:
        min_probability = OperatingPoint.load().min_probability
    return Verifier(VerifierWeights.load(), min_probability)


def feature(first: str, second: str, name: str) -> float:
    return float(features(first, second, 0.95)[FEATURES.index(name)])


def test_words_keep_numbers_and_fold_negations() -> None:
    assert words("Don't pay 3.5 USD, isn't it?") == ["dont", "pay", "3.5", "usd", "isnt", "it"]


@pytest.mark.parametrize(
    ("first", "second", "veto"),
    [
        ("how do i convert eur to usd", "how do i convert usd to eur", "same_words_reordered"),
        ("flights to paris for 2 people", "flights to paris for 3 people", "number_conflict"),
        ("what is the best laptop", "what is the best laptop in 2024", "number_one_side"),
        ("is coffee healthy", "is coffee not healthy", "negation_mismatch"),
    ],
)
def test_each_cross_check_vetoes_whatever_the_cosine(first: str, second: str, veto: str) -> None:
    assert feature(first, second, veto) == 1.0
    assert shipped(0.0).probability(first, second, 0.999) == 0.0


def test_a_true_paraphrase_passes_and_a_reworded_one_scores_lower_than_itself() -> None:
    verifier = shipped()
    same = verifier.probability("how do i reset my password", "how do i reset my password?", 0.99)
    paraphrase = verifier.probability(
        "i forgot my password, how can i change it?", "how do i reset my password?", 0.894
    )
    assert same > paraphrase >= verifier.min_probability


def test_weights_fitted_for_other_features_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(VerifierWeights.load().to_json().replace("features.v", "features.old"))
    with pytest.raises(ValueError, match="other features"):
        VerifierWeights.load(path)


def test_min_probability_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="min_probability"):
        Verifier(VerifierWeights.load(), 1.5)


def test_the_weights_carry_their_provenance_and_no_quora_data() -> None:
    data = VerifierWeights.load().provenance["data"]
    assert isinstance(data, dict) and set(data) <= {"paws_wiki_dev", "gptcache_mock_data"}


async def test_the_cache_refuses_a_vetoed_neighbour_and_serves_a_verified_one() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, verifier=shipped())
    assert (await cache.store(q("how do I convert EUR to USD"), answer())).stored
    swapped = await cache.check(q("how do I convert USD to EUR"))
    assert not swapped.hit and swapped.best_similarity > 0.99
    assert "verifier refused" in swapped.refusal
    assert (await cache.check(q("how do I convert EUR to USD?"))).hit  # punctuation only


async def test_an_ambiguous_lookup_between_two_answers_is_a_miss() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, margin=0.2)
    await cache.store(q("reset my password now"), answer(b"one"))
    await cache.store(q("reset my password today"), answer(b"two"))
    result = await cache.check(q("reset my password"))
    assert not result.hit and result.refusal.startswith("ambiguous")
    narrow = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, margin=0.0)
    await narrow.store(q("reset my password now"), answer(b"one"))
    await narrow.store(q("reset my password today"), answer(b"two"))
    assert (await narrow.check(q("reset my password"))).hit


async def test_two_neighbours_with_the_same_answer_are_not_ambiguous() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, margin=0.2)
    await cache.store(q("reset my password now"), answer(b"same"))
    await cache.store(q("reset my password today"), answer(b"same"))
    assert (await cache.check(q("reset my password"))).hit


def test_probabilities_are_vectorised_like_single_calls() -> None:
    verifier = shipped()
    pairs = [("a b c", "a b c d", 0.9), ("how to cook rice", "how do i cook rice", 0.93)]
    rows = np.stack([features(a, b, c) for a, b, c in pairs])
    batch = verifier.probabilities(rows)
    single = [verifier.probability(a, b, c) for a, b, c in pairs]
    assert np.allclose(batch, single)


async def test_a_refused_nearest_candidate_never_promotes_a_runner_up() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, verifier=shipped())
    await cache.store(q("how do I convert EUR to USD"), answer(b"eur->usd"))
    await cache.store(q("how do I convert USD to EUR quickly"), answer(b"usd->eur fast"))
    result = await cache.check(q("how do I convert USD to EUR"))
    assert not result.hit and "nearest" in result.refusal


def test_coverage_features_see_a_content_word_changed_on_one_side() -> None:
    first, second = "drivers licence in canada", "drivers licence in australia"
    assert feature(first, second, "query_coverage") == pytest.approx(2 / 3)
    assert feature(first, second, "entry_coverage") == pytest.approx(2 / 3)
    assert feature(first, second, "unmatched_content") == pytest.approx(2 / 6)
    assert feature(first, second, "same_bag") == 0.0
    assert feature("eur to usd", "usd to eur", "same_bag") == 1.0
    assert feature("what is rust", "rust", "min_coverage") == 1.0  # stopwords do not count
