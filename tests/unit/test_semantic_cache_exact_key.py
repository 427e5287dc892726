"""The exact-match key (``query.normalise``): what it keeps, what it folds, on the shipped
embedder and verifier (the paraphrase path must not serve what the exact key tells apart)."""

from __future__ import annotations

import unicodedata

import pytest

from services.semantic_cache.cache import MAX_STORED_QUESTION_CHARS
from services.semantic_cache.query import KEYED_CHARS, normalise
from tests.unit.test_semantic_cache_reading import shipped_cache
from tests.unit.test_semantic_cache_rules import answer, q

INDENTED = "    x = 1\n    print(x)"  # prints 1


def test_the_key_keeps_the_first_lines_own_indentation() -> None:
    """v2's key stripped the text: the first line lost its indentation and the others kept
    theirs, so "x = 1\\n    print(x)" (an IndentationError) had the key of INDENTED."""
    assert normalise(INDENTED) == "x = 1\nprint(x)"  # indented as a whole: the same code
    assert normalise("x = 1\n    print(x)") == "x = 1\n    print(x)"
    assert normalise("\n \n  if ok:\n      run()\n\n") == "if ok:\n    run()"
    assert normalise("  How do I reset my password?  ") == "How do I reset my password?"
    assert normalise("\tA\n\t  B") == "A\n  B"
    assert normalise("\tA\n    B") == "\tA\n    B"  # a tab is not four spaces


@pytest.mark.parametrize(
    ("asked", "served"),
    [
        ("x = 1\n    print(x)", False),  # its first line alone moved: another program
        ("x = 1\nprint(x)", True),  # the same program, indented as a whole
        ("  x = 1\n  print(x)", True),
    ],
)
async def test_code_whose_first_line_alone_moved_is_not_served(asked: str, served: bool) -> None:
    cache = shipped_cache()
    assert (await cache.store(q(INDENTED), answer())).stored
    result = await cache.check(q(asked))
    assert result.hit is served, result.refusal
    if served:
        assert result.exact


async def test_a_question_composed_or_decomposed_is_one_key() -> None:
    """An "é" of one code point or of two is one letter: v2 missed it on the exact path."""
    composed = "Was kostet ein Café in Zürich?"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed and normalise(decomposed) == composed
    cache = shipped_cache()
    assert (await cache.store(q(composed), answer())).stored
    assert (await cache.check(q(decomposed))).exact


def test_a_question_past_the_keyed_length_is_never_keyed_shorter_than_stored() -> None:
    """Past KEYED_CHARS the key is the stripped text, unread (a 1 MiB question held the loop
    40 ms read whole): longer than any question stored, so never matched nor stored."""
    assert KEYED_CHARS >= MAX_STORED_QUESTION_CHARS
    long = "    word\n" * (KEYED_CHARS // 4)
    assert len(normalise(long)) > MAX_STORED_QUESTION_CHARS
