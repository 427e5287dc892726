"""The tokenizer's encoding cache: bounded by the tokens it holds (plus a cost a text), not by
a count of texts (4,096 large documents would have held gigabytes)."""

from __future__ import annotations

import tiktoken

from services.common.tokens import ENTRY_COST, Tokenizer, load_cl100k


def _small(cached_tokens: int) -> Tokenizer:
    encoding: tiktoken.Encoding = load_cl100k()._encoding  # the same vocabulary
    return Tokenizer(encoding, cached_tokens=cached_tokens)


def test_each_text_is_held_once_with_its_cost() -> None:
    tokenizer = _small(cached_tokens=8 * (40 + ENTRY_COST))  # one 40-token text an eighth
    texts = [" ".join([word] * 40) for word in ("alpha", "beta", "gamma", "delta")]
    for text in texts * 2:
        assert tokenizer.count(text) == 40
    assert tokenizer.cached_tokens == 4 * (40 + ENTRY_COST)  # each held once
    assert tokenizer.encode(texts[0]) == load_cl100k().encode(texts[0])


def test_a_text_over_an_eighth_of_the_budget_is_encoded_but_never_held() -> None:
    tokenizer = _small(cached_tokens=8 * 500)
    document = " ".join(["word"] * 1000)
    assert tokenizer.count(document) == 1000 and tokenizer.cached_tokens == 0
    assert tokenizer.count("short text") == 2 and tokenizer.cached_tokens == 2 + ENTRY_COST


def test_the_oldest_text_goes_first_when_the_budget_is_reached() -> None:
    per = 40 + ENTRY_COST
    tokenizer = _small(cached_tokens=8 * per)  # room for eight such texts
    texts = [f"{i} " + " ".join(["word"] * 39) for i in range(9)]
    for text in texts:
        tokenizer.count(text)
    assert tokenizer.cached_tokens <= 8 * per
    assert texts[0] not in tokenizer._cached and texts[8] in tokenizer._cached
