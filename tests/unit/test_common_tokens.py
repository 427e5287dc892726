"""The tokenizer's encoding cache: bounded by the tokens it holds, not by a count of texts
(4,096 large documents would have held gigabytes)."""

from __future__ import annotations

import tiktoken

from services.common.tokens import Tokenizer, load_cl100k


def _small(cached_tokens: int, cached_text_chars: int) -> Tokenizer:
    encoding: tiktoken.Encoding = load_cl100k()._encoding  # the same vocabulary
    return Tokenizer(encoding, cached_tokens=cached_tokens, cached_text_chars=cached_text_chars)


def test_the_cache_holds_at_most_its_token_budget_least_recent_out_first() -> None:
    tokenizer = _small(cached_tokens=100, cached_text_chars=10_000)
    first, second, third = (" ".join([word] * 40) for word in ("alpha", "beta", "gamma"))
    for text in (first, second, first, third):  # first used again: second is the oldest
        assert tokenizer.count(text) == 40
    assert tokenizer.cached_tokens == 80  # third in, second out: first and third
    assert tokenizer.encode(first) == load_cl100k().encode(first)


def test_a_long_text_is_encoded_but_never_held() -> None:
    tokenizer = _small(cached_tokens=1_000_000, cached_text_chars=100)
    document = " ".join(["word"] * 1000)
    assert tokenizer.count(document) == 1000 and tokenizer.cached_tokens == 0
    assert tokenizer.count("short text") == 2 and tokenizer.cached_tokens == 2
