"""The verification step: its cross-checks, the shipped weights and cross-encoder, and the cache
applying it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.cross_encoder import F32, OnnxCrossEncoder, load_cross_encoder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.verifier import (
    FEATURES,
    VETOES,
    Verifier,
    VerifierWeights,
    features,
    words,
)
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer, q


@cache
def cross_encoder() -> OnnxCrossEncoder:
    return load_cross_encoder()


def shipped(min_probability: float | None = None) -> Verifier:
    """The shipped weights (and the shipped cross-encoder) at the shipped setting."""
    if min_probability is None:
        min_probability = OperatingPoint.load().min_probability
    return Verifier(VerifierWeights.load(), min_probability, cross_encoder())


def lexical(vetoes: Sequence[str] = VETOES) -> Verifier:
    """Weights on two lexical features that accept everything, but for the listed vetoes."""
    weights = VerifierWeights(
        ("cosine", "word_jaccard"), tuple(vetoes), (0.0, 0.0), (1.0, 1.0), (0.0, 0.0), 5.0, {}
    )
    return Verifier(weights, 0.5)


class LogitScorer:
    """A fake cross-encoder: a fixed logit per new question; can hold the caller."""

    version = "fake-ce@1"

    def __init__(self, logits: dict[str, float]) -> None:
        self.table = logits
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()

    def logits(self, pairs: Sequence[tuple[str, str]]) -> F32:
        self.entered.set()
        self.go.wait(10)
        return np.array([self.table.get(b, -9.0) for _, b in pairs], dtype=np.float32)


def by_logit(scorer: LogitScorer) -> Verifier:
    weights = VerifierWeights(("cross_encoder_logit",), (), (0.0,), (1.0,), (1.0,), 0.0, {})
    return Verifier(weights, 0.5, scorer)


def feature(first: str, second: str, name: str) -> float:
    return float(features(first, second, 0.95)[FEATURES.index(name)])


def test_words_keep_numbers_and_fold_negations() -> None:
    assert words("Don't pay 3.5 USD, isn't it?") == ["dont", "pay", "3.5", "usd", "isnt", "it"]


@pytest.mark.parametrize(
    ("first", "second", "veto"),
    [
        # not "eur to usd" / "usd to eur": contrasts.swapped refuses it whatever the weights
        ("does the dog bite the man", "does the man bite the dog", "same_words_reordered"),
        ("flights to paris for 2 people", "flights to paris for 3 people", "number_conflict"),
        ("what is the best laptop", "what is the best laptop in 2024", "number_one_side"),
        ("is coffee healthy", "is coffee not healthy", "negation_mismatch"),
    ],
)
def test_each_listed_cross_check_vetoes_whatever_the_cosine(
    first: str, second: str, veto: str
) -> None:
    assert feature(first, second, veto) == 1.0
    assert lexical().probability(first, second, 0.999) == 0.0
    unlisted = lexical(vetoes=()).probability(first, second, 0.999)
    if veto == "number_conflict":  # contrasts.number_conflict refuses it whatever the weights
        assert unlisted == 0.0
    else:
        assert unlisted > 0.99  # unlisted: no veto


def test_a_true_paraphrase_passes_and_a_reworded_one_scores_lower_than_itself() -> None:
    verifier = shipped()
    same = verifier.probability("how do i reset my password", "how do i reset my password?", 0.99)
    paraphrase = verifier.probability(
        "i forgot my password, how can i change it?", "how do i reset my password?", 0.894
    )
    assert same > paraphrase >= verifier.min_probability


@pytest.mark.parametrize(
    ("cached", "asked"),
    [
        ("how do i convert eur to usd?", "how do i convert usd to eur?"),
        (
            "is it safe to take aspirin with ibuprofen?",
            "is it safe to take aspirin without ibuprofen?",
        ),
        ("flights from paris to london", "flights from london to paris"),
        ("what is the capital of france?", "what is the capital of germany?"),
    ],
)
def test_the_shipped_verifier_refuses_near_misses_a_cosine_would_serve(
    cached: str, asked: str
) -> None:
    assert not shipped().accepts(cached, asked, 0.95)


def test_weights_fitted_for_other_features_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(VerifierWeights.load().to_json().replace("features.v", "features.old"))
    with pytest.raises(ValueError, match="other features"):
        VerifierWeights.load(path)


def test_min_probability_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="min_probability"):
        Verifier(VerifierWeights.load(), 1.5, cross_encoder())


def test_weights_using_the_cross_encoder_refuse_to_run_without_it() -> None:
    weights = VerifierWeights.load()
    assert weights.needs_cross_encoder
    with pytest.raises(ValueError, match="cross-encoder"):
        Verifier(weights, 0.5)


def test_the_weights_carry_their_provenance_and_no_quora_data() -> None:
    weights = VerifierWeights.load()
    data = weights.provenance["data"]
    allowed = {"paws_wiki_dev", "gptcache_mock_data", "generated_near_misses"}
    assert isinstance(data, dict) and set(data) <= allowed
    assert weights.provenance["cross_encoder"] == cross_encoder().version


async def test_the_cache_refuses_a_vetoed_neighbour_and_serves_a_verified_one() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, verifier=lexical())
    assert (await cache.store(q("does the dog bite the man"), answer())).stored
    swapped = await cache.check(q("does the man bite the dog"))
    assert not swapped.hit and swapped.best_similarity > 0.99
    assert "verifier refused" in swapped.refusal
    assert (await cache.check(q("does the dog bite the man?"))).hit  # punctuation only


async def test_an_ambiguous_lookup_between_two_answers_is_a_miss() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, margin=0.2)
    await cache.store(q("reset my password quickly"), answer(b"one"))
    await cache.store(q("reset my password asap"), answer(b"two"))
    result = await cache.check(q("reset my password"))
    assert not result.hit and result.refusal.startswith("ambiguous")
    narrow = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, margin=0.0)
    await narrow.store(q("reset my password quickly"), answer(b"one"))
    await narrow.store(q("reset my password asap"), answer(b"two"))
    assert (await narrow.check(q("reset my password"))).hit


async def test_two_neighbours_with_the_same_answer_are_not_ambiguous() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, margin=0.2)
    await cache.store(q("reset my password quickly"), answer(b"same"))
    await cache.store(q("reset my password asap"), answer(b"same"))
    assert (await cache.check(q("reset my password"))).hit


def test_probabilities_are_vectorised_like_single_calls() -> None:
    verifier = shipped()
    pairs = [("a b c", "a b c d", 0.9), ("how to cook rice", "how do i cook rice", 0.93)]
    firsts, seconds, cosines = zip(*pairs, strict=True)
    batch = verifier.probabilities_of(firsts, seconds, cosines)
    single = [verifier.probability(a, b, c) for a, b, c in pairs]
    assert np.allclose(batch, single, atol=1e-5)
    assert verifier.accepts_all(pairs) == [p >= verifier.min_probability for p in single]


async def test_the_cross_encoder_runs_off_the_event_loop() -> None:
    scorer = LogitScorer({"reset my password please": 3.0})
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, verifier=by_logit(scorer))
    await cache.store(q("reset my password"), answer())
    scorer.go.clear()
    lookup = asyncio.create_task(cache.check(q("reset my password please")))
    assert await asyncio.to_thread(scorer.entered.wait, 10)
    ticks = 0
    while not lookup.done() and ticks < 5:  # the loop is free while the scorer runs
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 5 and not lookup.done()
    scorer.go.set()
    assert (await lookup).hit


async def test_an_entry_dropped_while_it_was_verified_is_not_served() -> None:
    scorer = LogitScorer({"reset my password please": 3.0})
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, verifier=by_logit(scorer))
    await cache.store(q("reset my password"), answer())
    scorer.go.clear()
    lookup = asyncio.create_task(cache.check(q("reset my password please")))
    assert await asyncio.to_thread(scorer.entered.wait, 10)
    assert await cache.drop("a") == 1
    scorer.go.set()
    result = await lookup
    assert not result.hit and "changed while it was verified" in result.refusal


async def test_runners_up_with_another_answer_are_verified_in_the_same_batch() -> None:
    scorer = LogitScorer({"reset my password": 3.0})
    cache = SemanticCache(
        FakeEmbedder(), ManualClock(), threshold=0.5, verifier=by_logit(scorer), margin=0.3
    )
    await cache.store(q("reset my password quickly"), answer(b"one"))
    await cache.store(q("reset my password asap"), answer(b"two"))
    result = await cache.check(q("reset my password"))
    assert not result.hit and result.refusal.startswith("ambiguous")
    refused = LogitScorer({})  # the nearest refused: a miss, no runner-up promoted
    cache2 = SemanticCache(
        FakeEmbedder(), ManualClock(), threshold=0.5, verifier=by_logit(refused), margin=0.3
    )
    await cache2.store(q("reset my password quickly"), answer(b"one"))
    assert "nearest" in (await cache2.check(q("reset my password"))).refusal


async def test_a_refused_nearest_candidate_never_promotes_a_runner_up() -> None:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.5, verifier=lexical())
    await cache.store(q("does the dog bite the man"), answer(b"dog->man"))
    await cache.store(q("does the man bite the dog quickly"), answer(b"man->dog fast"))
    result = await cache.check(q("does the man bite the dog"))
    assert not result.hit and "nearest" in result.refusal


def test_coverage_features_see_a_content_word_changed_on_one_side() -> None:
    first, second = "drivers licence in canada", "drivers licence in australia"
    assert feature(first, second, "query_coverage") == pytest.approx(2 / 3)
    assert feature(first, second, "entry_coverage") == pytest.approx(2 / 3)
    assert feature(first, second, "unmatched_content") == pytest.approx(2 / 6)
    assert feature(first, second, "same_bag") == 0.0
    assert feature("eur to usd", "usd to eur", "same_bag") == 1.0
    assert feature("what is rust", "rust", "min_coverage") == 1.0  # stopwords do not count


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # not enable / disable: opposites are refused whatever the score (contrasts.opposites)
        ("how do i enable 2fa?", "how do i set up 2fa?"),
        ("hi, i pay by card. how do i enable 2fa?", "hello, i pay by card. how do i enable 2fa?"),
        ("i pay by card, how do i enable 2fa?", "i pay by card, how do i set up 2fa?"),
        ("i pay by card. how do i enable 2fa?", "i pay by card! how do i enable 2fa?"),
        ("the same sentence.", "the same sentence."),
        ("eur to usd. thanks", "eur to usd"),
    ],
)
def test_a_pair_sharing_no_leading_sentence_is_scored_exactly_as_before(
    first: str, second: str
) -> None:
    """The calibration holds: the shared-opening step changes nothing for such pairs."""
    from services.semantic_cache.reading import differing
    from services.semantic_cache.verifier import rows

    assert differing(first, second) == (first, second)
    verifier = shipped()
    before = verifier.probabilities(rows([first], [second], [0.91], verifier.cross_encoder))
    assert verifier.probability(first, second, 0.91) == float(before[0])


class CountedWord(str):
    """A word that counts how often it is hashed or compared (a quadratic scan shows)."""

    calls = 0

    def __hash__(self) -> int:
        CountedWord.calls += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        CountedWord.calls += 1
        return str.__eq__(self, other)


def slow_discordance(a: list[str], b: list[str]) -> float:
    """The former quadratic definition, as the reference."""
    once = [w for w in a if a.count(w) == 1 and b.count(w) == 1]
    if len(once) < 2:
        return 0.0
    pos_b = {w: b.index(w) for w in once}
    pairs = [(pos_b[x], pos_b[y]) for i, x in enumerate(once) for y in once[i + 1 :]]
    return sum(p > q for p, q in pairs) / len(pairs)


def test_order_discordance_is_the_same_figure_in_n_log_n() -> None:
    from services.semantic_cache.verifier import _discordance

    rng = np.random.default_rng(3)
    for _ in range(300):
        vocab = [f"w{i}" for i in range(int(rng.integers(1, 12)))]
        a = [str(rng.choice(vocab)) for _ in range(int(rng.integers(0, 14)))]
        b = [str(rng.choice(vocab)) for _ in range(int(rng.integers(0, 14)))]
        assert _discordance(a, b) == slow_discordance(a, b), (a, b)
    n = 3_000  # two ~20 kB questions of distinct words
    a = [CountedWord(f"w{i}") for i in range(n)]
    b = [CountedWord(w) for w in rng.permutation(a).tolist()]
    CountedWord.calls = 0
    value = _discordance(a, b)
    assert 0.4 < value < 0.6 and CountedWord.calls <= 20 * n  # scanning: over n * n
