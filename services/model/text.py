"""The simulator's answers: deterministic English derived from the prompt.

The answer is a pure function of (model, canonical prompt, temperature): the same request gets
the same words, a different one different words. It opens with a marker that says it is a
simulation, then sentences of common English words, each word a single cl100k token, so the
text tokenizes like prose and any token prefix of it re-tokenizes to exactly that many tokens.
Its natural length (20-120 tokens) comes from the same seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from services.common import tool_choice
from services.common.prompt import block_text
from services.common.tokens import Tokenizer

MIN_ANSWER_TOKENS = 20
MAX_ANSWER_TOKENS = 120
_MIN_SENTENCE = 4  # tokens, the full stop included
_MAX_SENTENCE = 15

_WORDS: dict[str, tuple[str, ...]] = {
    "det": ("the", "this", "each", "every", "that", "one", "our", "your", "any", "some"),
    "adj": (
        "simple", "small", "large", "quick", "careful", "clear", "short", "long", "early",
        "late", "local", "common", "useful", "stable", "fresh", "final", "main", "real", "full",
        "safe", "open", "public", "private", "direct", "total", "single", "warm", "cold",
    ),
    "noun": (
        "cache", "answer", "request", "model", "prompt", "token", "system", "user", "question",
        "result", "value", "record", "server", "client", "service", "message", "layer", "price",
        "cost", "time", "team", "plan", "data", "file", "table", "index", "version", "policy",
        "rule", "window", "block", "prefix", "reply", "query", "signal", "report", "method",
    ),
    "verb": (
        "keeps", "returns", "sends", "holds", "reads", "writes", "finds", "shows", "makes",
        "takes", "uses", "gives", "needs", "builds", "checks", "moves", "saves", "serves",
        "stores", "marks", "starts", "follows", "explains", "matches",
    ),
    "adv": ("often", "quickly", "always", "rarely", "usually", "carefully", "again", "soon"),
    "prep": ("for", "with", "from", "into", "over", "under", "after", "before", "near"),
    "conj": ("and", "but", "so", "while", "because"),
}  # fmt: skip
# Phrases that may follow the object, by their length in words.
_TAILS: dict[int, tuple[tuple[str, ...], ...]] = {
    1: (("adv",),),
    2: (("prep", "noun"),),
    3: (("prep", "det", "noun"),),
    4: (("prep", "det", "adj", "noun"), ("conj", "det", "noun", "verb")),
    5: (("conj", "det", "adj", "noun", "verb"),),
}


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]
    stop_reason: str  # "end_turn" | "max_tokens" | "tool_use"
    # a forced tool choice's call (``compose_tool_call``): the answer is this one block, its
    # tokens ``token_ids`` (the call as the canonical prompt writes a tool_use), no text
    call: pb.ToolUse | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


def marker(model: str) -> str:
    return f"[simulated {model} answer]"


def seed_of(model: str, prompt_digest: str, temperature: float) -> bytes:
    """sha256 over the model, the canonical prompt (its chained digest) and the temperature."""
    material = f"{model}\x00{prompt_digest}\x00{temperature!r}"
    return hashlib.sha256(material.encode("utf-8")).digest()


def natural_length(seed: bytes) -> int:
    span = MAX_ANSWER_TOKENS - MIN_ANSWER_TOKENS + 1
    return MIN_ANSWER_TOKENS + int.from_bytes(seed[:8], "big") % span


def compose_answer(model: str, seed: bytes, max_tokens: int, tokenizer: Tokenizer) -> Answer:
    """The full answer, cut at exactly ``max_tokens`` tokens when it would run longer."""
    head = marker(model)
    target = natural_length(seed)
    draws = _draws(seed)
    budget = target - tokenizer.count(head)
    sentences = [_sentence(words, draws) for words in _sentence_lengths(budget, draws)]
    text = head + "".join(sentences)
    stop_reason = "end_turn"
    natural = tokenizer.encode(text)
    if len(natural) > max_tokens:
        text, stop_reason = tokenizer.decode(list(natural[:max_tokens])), "max_tokens"
    # The ids of the text actually sent (every word is one token, so a cut keeps its count).
    return Answer(text, tokenizer.encode(text), stop_reason)


def compose_tool_call(
    request: pb.CompleteRequest, seed: bytes, max_tokens: int, tokenizer: Tokenizer
) -> Answer | None:
    """A forced tool choice's answer (ANY: a tool picked from the seed; TOOL: the named one),
    its input ``{}``, stop_reason tool_use; None when the choice forces none (auto, none, no
    tools). A call longer than ``max_tokens`` is cut before it is whole: no block, the
    ``max_tokens`` tokens billed, stop_reason max_tokens (a provider's half-written call goes
    nowhere either)."""
    mode = tool_choice.sent_mode(request)
    if mode not in ("any", "tool"):
        return None
    if mode == "tool":
        name = request.tool_choice.name
    else:
        name = request.tools[int.from_bytes(seed[8:16], "big") % len(request.tools)].name
    call = pb.ToolUse(id=f"toolu_sim_{seed[:12].hex()}", name=name, input_json="{}")
    ids = tokenizer.encode(block_text(pb.ContentBlock(tool_use=call)))
    if len(ids) > max_tokens:
        return Answer("", tuple(ids[:max_tokens]), "max_tokens")
    return Answer("", tuple(ids), "tool_use", call)


def _draws(seed: bytes) -> Iterator[int]:
    """An endless deterministic stream of 32-bit numbers from the seed."""
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        for offset in range(0, len(block), 4):
            yield int.from_bytes(block[offset : offset + 4], "big")
        counter += 1


def _sentence_lengths(budget: int, draws: Iterator[int]) -> list[int]:
    """Words per sentence; with the one-token full stop of each, they sum to ``budget``."""
    lengths: list[int] = []
    remaining = budget
    while remaining >= _MIN_SENTENCE:  # only a very long model id leaves less than a sentence
        if remaining <= _MAX_SENTENCE:
            size = remaining
        else:
            top = min(_MAX_SENTENCE, remaining - _MIN_SENTENCE)
            size = _MIN_SENTENCE + next(draws) % (top - _MIN_SENTENCE + 1)
        lengths.append(size - 1)
        remaining -= size
    return lengths


def _shape(words: int, draws: Iterator[int]) -> list[str]:
    """Word classes of a sentence of ``words`` words: subject, verb, object, then tails."""
    if words <= 3:
        return ["det", "noun", "verb"][3 - words :]
    shape = ["det", "adj", "noun"] if words >= 6 and next(draws) % 2 else ["det", "noun"]
    shape.append("verb")
    rest = words - len(shape)
    if rest >= 2:
        obj = ["det", "adj", "noun"] if rest >= 3 and next(draws) % 2 else ["det", "noun"]
        shape += obj
        rest -= len(obj)
    while rest > 0:
        sizes = [size for size in _TAILS if min(rest, 3) <= size <= rest]
        options = _TAILS[sizes[next(draws) % len(sizes)]]
        tail = options[next(draws) % len(options)]
        shape += tail
        rest -= len(tail)
    return shape


def _sentence(words: int, draws: Iterator[int]) -> str:
    picked = [_WORDS[kind][next(draws) % len(_WORDS[kind])] for kind in _shape(words, draws)]
    picked[0] = picked[0].capitalize()
    return "".join(" " + word for word in picked) + "."
