"""The verifier's generated data and split: deterministic, labelled by rule, probes kept out."""

from __future__ import annotations

from collections import Counter

from services.tools.evaluation.semantic_cache.datasets import Pair, half_of
from services.tools.verifier.near_misses import PROBES, generate
from services.tools.verifier.splits import slice_of


def test_the_generator_is_deterministic_and_covers_every_category() -> None:
    pairs = generate()
    assert pairs == generate()
    categories = Counter(p.category for p in pairs)
    assert set(categories) == {
        "paraphrase",
        "symmetric_swap",
        "swap",
        "negation",
        "antonym",
        "number",
        "entity",
        "modifier",
        "pronoun",
    }
    assert all(p.label == (p.category in ("paraphrase", "symmetric_swap")) for p in pairs)
    assert 0.4 < sum(p.label for p in pairs) / len(pairs) < 0.6
    assert len({(p.first, p.second) for p in pairs}) == len(pairs)


def test_the_issues_probe_questions_are_never_generated() -> None:
    texts = {" ".join(t.casefold().split()) for p in generate() for t in (p.first, p.second)}
    assert not texts & PROBES


def test_a_swap_exchanges_the_arguments_and_keeps_the_words() -> None:
    swaps = [p for p in generate() if p.category == "swap" and p.frame == "convert_currency"]
    assert swaps
    for p in swaps:
        assert p.first != p.second and not p.label


def test_the_slices_refine_the_harness_halves() -> None:
    for p in generate()[:2000]:
        part = slice_of(p.first)
        assert (part == "report") == (half_of(Pair(p.first, p.second, p.label)) == "report")
    parts = Counter(slice_of(p.first) for p in generate())
    assert parts["tune"] * 2 < parts["train"]  # a quarter of the fit half
