"""Function words written in capitals are names ("IT", "US", "WHO"): never served for the
word ("it", "us", "who"), neither on the exact path nor on the paraphrase path."""

from __future__ import annotations

import pytest

from services.semantic_cache.capitals import function_word_forms
from services.semantic_cache.metrics import refusal_reason
from tests.unit.test_semantic_cache_reading import shipped_cache
from tests.unit.test_semantic_cache_rules import answer, q

NAMED_APART = [
    ("What does IT stand for?", "what does it stand for?"),  # the folded key: exact path
    ("what does it stand for?", "What does IT stand for?"),
    ("What does IT stand for?", "what does it stand for"),  # the paraphrase path
    ("what is US healthcare like?", "what is us healthcare like?"),
    ("Is WHO a reliable source?", "is who a reliable source?"),
]


@pytest.mark.parametrize(("stored", "asked"), NAMED_APART)
async def test_a_function_word_in_capitals_is_not_served_for_the_word(
    stored: str, asked: str
) -> None:
    """v2 served each of these at similarity 1.0 (or 0.97 on the paraphrase path): the
    models lowercase both, and the folded key took the capitals for casual typing."""
    cache = shipped_cache()
    assert (await cache.store(q(stored), answer())).stored
    result = await cache.check(q(asked))
    assert not result.hit, f"served the answer of {stored!r} to {asked!r}"
    assert refusal_reason(result.refusal) == "unreadable", result.refusal
    assert (await cache.check(q(stored))).exact


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("HOW DO I RESET MY PASSWORD", "how do i reset my password"),  # shouted: no name
        ("Flights Rome to Chicago", "flights rome to chicago"),  # not function words
        ("How do I reset my password?", "how do i reset my password?"),
    ],
)
async def test_capitals_that_name_nothing_are_still_served(stored: str, asked: str) -> None:
    cache = shipped_cache()
    assert (await cache.store(q(stored), answer())).stored
    result = await cache.check(q(asked))
    assert result.hit and result.exact, result.refusal


def test_forms_name_a_word_written_in_capitals_in_a_text_with_lowercase() -> None:
    assert function_word_forms("What does IT mean, and is it new?")["it"] == ["name"]
    assert function_word_forms("what does it mean?")["it"] == ["word"]
    assert function_word_forms("WHAT DOES IT MEAN?")["it"] == ["word"]  # all in capitals
    assert "rome" not in function_word_forms("Flights Rome to Chicago")
