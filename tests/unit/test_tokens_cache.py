"""The tokenizer's cache of recent encodings stays within its memory budget whatever the text:
it was charged by tokens only, so texts of many characters a token (a run of ``=`` is ~64 a
token) held 2.5x the documented memory (127 texts of 1 MB kept: +242 MB RSS)."""

from __future__ import annotations

import sys

from services.common.tokens import TOKEN_BYTES, Tokenizer, load_cl100k


def _held_bytes(tokenizer: Tokenizer) -> int:
    cached = tokenizer._cached  # what the cache holds: each text and its ids
    return sum(sys.getsizeof(text) + TOKEN_BYTES * len(ids) for text, ids in cached.items())


def test_texts_of_many_characters_a_token_stay_within_the_budget() -> None:
    budget = 100_000
    tokenizer = Tokenizer(load_cl100k()._encoding, cached_tokens=budget)
    for i in range(200):
        tokenizer.encode(f"{i}:" + "=" * 20_000)  # ~313 tokens of 20 kB each
    assert _held_bytes(tokenizer) <= budget * TOKEN_BYTES
    assert tokenizer.cached_tokens <= budget


def test_prose_is_still_cached_and_served_from_the_cache() -> None:
    tokenizer = Tokenizer(load_cl100k()._encoding, cached_tokens=100_000)
    text = "The order ships within two business days of payment. " * 50
    first = tokenizer.encode(text)
    assert tokenizer.encode(text) is first  # the cached tuple itself
