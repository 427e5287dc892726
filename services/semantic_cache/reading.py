"""What the models can read of the two questions a non-exact candidate pairs.

DESIGN.md, "What a cache hit may serve": a wrong answer is worse than a miss, so a candidate is
refused when the embedding and the verifier cannot see what tells the two questions apart.

The embedder and the cross-encoder share one tokenizer (bert-base-uncased's vocabulary). What it
lacks (most CJK, all Thai, emoji) it reads as ``[UNK]``: "如何删除我的账户" (delete my account)
and "如何创建我的账户" (create my account) are the same tokens to both models, cosine 1.0, and the
cross-encoder accepts them (p 0.93-0.996); so are "👍" and "👎". ``Reader.unknown`` gives the
substrings a text's ``[UNK]`` tokens stand for (from the tokenizer's offsets): a candidate is
served only when the two questions' are the same, in order.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from services.semantic_cache.embedder import TOKENIZER_SHA256, checked_file, default_tokenizer_path

if TYPE_CHECKING:
    from tokenizers import Tokenizer

UNREADABLE = (
    "unreadable: the questions differ in characters the models read as [UNK] (outside their"
    " vocabulary: most CJK, Thai, emoji)"
)


class Reader:
    """The shared tokenizer, untruncated and unpadded (thread-safe: it is only read)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._unk = tokenizer.token_to_id("[UNK]")

    def unknown(self, text: str) -> tuple[str, ...]:
        """The substrings of ``text`` the tokenizer reads as ``[UNK]``, in order."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return tuple(
            text[start:end]
            for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
            if token == self._unk
        )

    def refusal(self, first: str, second: str) -> str:
        """Why the models cannot tell the two apart ("" = nothing found)."""
        if self.unknown(first) != self.unknown(second):
            return UNREADABLE
        return ""


def load_reader(tokenizer_path: Path | None = None) -> Reader:
    """The pinned tokenizer (sha256-checked), read as the models read it."""
    from tokenizers import Tokenizer

    path = checked_file(
        tokenizer_path or default_tokenizer_path(), TOKENIZER_SHA256, "tokenizer.json"
    )
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return Reader(tokenizer)


@cache
def shipped_reader() -> Reader:
    """``load_reader()`` once per process."""
    return load_reader()
