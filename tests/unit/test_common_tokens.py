"""The tokenizers: each vocabulary loaded offline and once, the one a model row names; and the
encoding cache, bounded by what it holds (tokens, a cost a text and the text's bytes), not by a
count of texts (4,096 large documents would have held gigabytes)."""

from __future__ import annotations

import sys

import pytest
import tiktoken

from services.common.models import load_model_table
from services.common.tokens import (
    CL100K,
    O200K,
    TOKEN_BYTES,
    Tokenizer,
    TokenizerError,
    load_cl100k,
    load_tokenizers,
    load_vocabulary,
)
from services.common.tokens import cached_cost as cost


def _small(cached_tokens: int) -> Tokenizer:
    encoding: tiktoken.Encoding = load_cl100k()._encoding  # the same vocabulary
    return Tokenizer(encoding, cached_tokens=cached_tokens)


def test_each_text_is_held_once_with_its_cost() -> None:
    texts = [" ".join([word] * 40) for word in ("alpha", "beta", "gamma", "delta")]
    costs = [cost(text, load_cl100k().encode(text)) for text in texts]
    tokenizer = _small(cached_tokens=8 * max(costs))  # each text within an eighth
    for text in texts * 2:
        assert tokenizer.count(text) == 40
    assert tokenizer.cached_tokens == sum(costs)  # each held once
    assert tokenizer.encode(texts[0]) == load_cl100k().encode(texts[0])


def test_a_text_over_an_eighth_of_the_budget_is_encoded_but_never_held() -> None:
    tokenizer = _small(cached_tokens=8 * 500)
    document = " ".join(["word"] * 1000)
    assert tokenizer.count(document) == 1000 and tokenizer.cached_tokens == 0
    short = "short text"
    assert tokenizer.count(short) == 2
    assert tokenizer.cached_tokens == cost(short, tokenizer.encode(short))


def test_a_text_asked_for_again_outlives_texts_seen_once() -> None:
    texts = [f"{i} " + " ".join(["word"] * 39) for i in range(40)]
    per = max(cost(text, load_cl100k().encode(text)) for text in texts)
    tokenizer = _small(cached_tokens=8 * per)  # room for eight such texts
    tokenizer.count(texts[0])
    tokenizer.count(texts[0])  # asked for again: protected
    for text in texts[1:]:  # a scan of texts seen once
        tokenizer.count(text)
    assert tokenizer.cached_tokens <= 8 * per
    assert texts[0] in tokenizer._cache
    assert tokenizer.cache_stats().hits == 1 and tokenizer.cache_stats().misses == 40


def _sessions_in_turn(tokenizer: Tokenizer, sessions: int, blocks: int, rounds: int) -> float:
    """The hit share of the last round of ``sessions`` prompts of ``blocks`` texts each, asked
    for in turn (agents' sessions served round robin)."""
    prompts = [
        [f"session {s} block {b} " + "word " * 30 for b in range(blocks)] for s in range(sessions)
    ]
    for _ in range(rounds - 1):
        for prompt in prompts:
            for text in prompt:
                tokenizer.encode(text)
    before = tokenizer.cache_stats()
    for prompt in prompts:
        for text in prompt:
            tokenizer.encode(text)
    after = tokenizer.cache_stats()
    return (after.hits - before.hits) / (sessions * blocks)


def test_sessions_in_turn_over_the_budget_keep_most_of_their_hits() -> None:
    """Least recently used out first, sessions taken in turn whose texts outgrow the budget
    never hit: each text was evicted just before it was asked for again (14 agent sessions of
    200k tokens: 83 ms a turn re-encoding, against 17 ms for 10)."""
    texts = [f"session 0 block {b} " + "word " * 30 for b in range(4)]
    per = max(cost(text, load_cl100k().encode(text)) for text in texts)
    fits = _small(cached_tokens=60 * 50 * per)  # room for 50 sessions of 60 texts
    assert _sessions_in_turn(fits, sessions=10, blocks=60, rounds=3) == 1.0
    # 18 sessions where ~13 fit: an LRU hits nothing; a stable part stays cached
    over = _small(cached_tokens=60 * 13 * per)
    assert _sessions_in_turn(over, sessions=18, blocks=60, rounds=4) >= 0.6


def test_a_new_working_set_comes_in_after_an_old_one() -> None:
    texts = [f"0 {i} " + "word " * 30 for i in range(4)]
    per = max(cost(text, load_cl100k().encode(text)) for text in texts)
    tokenizer = _small(cached_tokens=200 * per)
    old = [f"old {i} " + "word " * 30 for i in range(200)]
    new = [f"new {i} " + "word " * 30 for i in range(150)]
    for _ in range(3):
        for text in old:
            tokenizer.encode(text)
    for _ in range(40):
        before = tokenizer.cache_stats().hits
        for text in new:
            tokenizer.encode(text)
    assert tokenizer.cache_stats().hits - before >= 0.9 * len(new)


def _held_bytes(tokenizer: Tokenizer) -> int:
    cached = tokenizer._cache.items()  # what the cache holds: each text and its ids
    return sum(sys.getsizeof(text) + TOKEN_BYTES * len(ids) for text, ids in cached)


def test_texts_of_many_characters_a_token_stay_within_the_budget() -> None:
    """Charged by tokens alone, texts of many characters a token (a run of "=" is ~64 a token)
    held 2.5x the documented memory (127 texts of 1 MB kept: +242 MB RSS)."""
    budget = 100_000
    tokenizer = _small(cached_tokens=budget)
    for i in range(200):
        tokenizer.encode(f"{i}:" + "=" * 20_000)  # ~313 tokens of 20 kB each
    assert _held_bytes(tokenizer) <= budget * TOKEN_BYTES
    assert tokenizer.cached_tokens <= budget


def test_each_vocabulary_loads_offline_checked_and_encodes_as_tiktoken_does() -> None:
    """tiktoken's own test vectors (tests/test_encoding.py: "hello world")."""
    assert load_vocabulary(CL100K).encode("hello world") == (15339, 1917)
    assert load_vocabulary(O200K).encode("hello world") == (24912, 2375)
    assert load_vocabulary(O200K).name == O200K


def test_a_vocabulary_is_loaded_once_per_process() -> None:
    assert load_vocabulary(O200K) is load_vocabulary(O200K)
    assert load_cl100k() is load_vocabulary(CL100K)


def test_only_the_vocabularies_the_rows_name_are_loaded() -> None:
    table = load_model_table()
    claude = load_tokenizers([table.models["sim-small"], table.models["claude-sonnet-4-5"]])
    assert claude.names == (CL100K,)
    with pytest.raises(TokenizerError, match="gpt-4o is counted with o200k_base"):
        claude.for_spec(table.models["gpt-4o"])
    both = load_tokenizers(table.models.values())
    assert both.for_spec(table.models["gpt-4o"]).name == O200K
    assert both.for_spec(table.models["claude-sonnet-4-5"]).name == CL100K
    with pytest.raises(TokenizerError, match="unknown vocabulary 'p50k_base'"):
        load_vocabulary("p50k_base")


def test_openai_rows_count_with_o200k_and_the_others_with_cl100k() -> None:
    """OpenAI's gpt-4o, gpt-4.1 and gpt-5 families tokenize with o200k_base; counting them
    with cl100k_base over-counted a Japanese prompt by 43% (2,411 tokens for 1,689)."""
    for spec in load_model_table().models.values():
        expected = O200K if spec.provider == "openai" else CL100K
        assert spec.tokenizer == expected, spec.id
        if spec.provider == "openai":  # tiktoken's own model map (offline) agrees
            assert tiktoken.encoding_name_for_model(spec.upstream) == spec.tokenizer, spec.id


@pytest.mark.parametrize("text", [" " * 1_000_000, "{" + " " * 1_000_000 + "}"])
def test_a_megabyte_run_of_spaces_is_counted_not_raised(text: str) -> None:
    """o200k's regex overflowed its backtracking stack on a megabyte of spaces (ValueError): an
    upstream's whitespace runaway left its answer with no end and no bill. Such a text is
    encoded in slices, its count within a few tokens of the run's (128 spaces a token)."""
    tokenizer = load_vocabulary("o200k_base")
    whole = len(text) // 128
    assert whole <= tokenizer.count_once(text) <= whole + 16
    assert tokenizer.count(text) == tokenizer.count_once(text)
