"""The simulator's answers: determinism, natural length, max_tokens cuts, exact token counts."""

from __future__ import annotations

import hashlib

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import canonical_blocks, prompt_digest
from services.common.tokens import Tokenizer, load_cl100k
from services.model.text import (
    MAX_ANSWER_TOKENS,
    MIN_ANSWER_TOKENS,
    compose_answer,
    marker,
    natural_length,
    seed_of,
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _request(question: str, temperature: float | None = None) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text="You are a helpful assistant.")],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=1000,
    )
    if temperature is not None:
        request.temperature = temperature
    return request


def _seed(tokenizer: Tokenizer, request: pb.CompleteRequest, model: str = "sim-large") -> bytes:
    temperature = request.temperature if request.HasField("temperature") else 1.0
    return seed_of(model, prompt_digest(canonical_blocks(request, tokenizer)), temperature)


def _seeds(count: int) -> list[bytes]:
    return [hashlib.sha256(f"seed {i}".encode()).digest() for i in range(count)]


def test_same_prompt_same_answer(tokenizer: Tokenizer) -> None:
    first = compose_answer(
        "sim-large", _seed(tokenizer, _request("What is KV caching?")), 1000, tokenizer
    )
    again = compose_answer(
        "sim-large", _seed(tokenizer, _request("What is KV caching?")), 1000, tokenizer
    )
    assert first == again


def test_different_prompt_model_or_temperature_changes_the_answer(tokenizer: Tokenizer) -> None:
    base = _seed(tokenizer, _request("What is KV caching?"))
    others = [
        _seed(tokenizer, _request("What is prefix caching?")),
        _seed(tokenizer, _request("What is KV caching?"), model="sim-small"),
        _seed(tokenizer, _request("What is KV caching?", temperature=0.0)),
    ]
    text = compose_answer("sim-large", base, 1000, tokenizer).text
    for seed in others:
        assert seed != base
        assert compose_answer("sim-large", seed, 1000, tokenizer).text != text
    # Unset temperature means 1.0.
    assert _seed(tokenizer, _request("What is KV caching?", temperature=1.0)) == base


def test_answer_says_it_is_simulated_and_reads_as_english(tokenizer: Tokenizer) -> None:
    answer = compose_answer("sim-small", _seeds(1)[0], 1000, tokenizer)
    assert answer.text.startswith("[simulated sim-small answer] ")
    assert marker("sim-small") == "[simulated sim-small answer]"
    body = answer.text.removeprefix(marker("sim-small"))
    assert body.endswith(".")
    words = body.replace(".", " ").split()
    assert len(words) >= 8 and all(word.isalpha() for word in words)
    # Real words: roughly one token each, not one token per character.
    assert answer.tokens < len(answer.text) / 3


def test_natural_length_spans_20_to_120_and_ends_by_itself(tokenizer: Tokenizer) -> None:
    lengths = []
    for seed in _seeds(200):
        answer = compose_answer("sim-large", seed, 64000, tokenizer)
        assert answer.stop_reason == "end_turn"
        assert answer.tokens == natural_length(seed)
        lengths.append(answer.tokens)
    assert min(lengths) >= MIN_ANSWER_TOKENS and max(lengths) <= MAX_ANSWER_TOKENS
    assert min(lengths) < 40 and max(lengths) > 100  # the seed really spreads them


def test_max_tokens_cuts_at_exactly_that_many_tokens(tokenizer: Tokenizer) -> None:
    for seed in _seeds(40):
        natural = compose_answer("sim-large", seed, 64000, tokenizer)
        for limit in range(1, natural.tokens + 2):
            answer = compose_answer("sim-large", seed, limit, tokenizer)
            expected = min(limit, natural.tokens)
            assert answer.tokens == expected
            assert tokenizer.count(answer.text) == expected
            assert natural.text.startswith(answer.text)
            stop = "max_tokens" if limit < natural.tokens else "end_turn"
            assert answer.stop_reason == stop


def test_answer_token_ids_are_those_of_its_text(tokenizer: Tokenizer) -> None:
    for seed in _seeds(20):
        answer = compose_answer("sim-large", seed, 50, tokenizer)
        assert answer.token_ids == tokenizer.encode(answer.text)
        assert tokenizer.decode(list(answer.token_ids)) == answer.text
