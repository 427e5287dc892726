"""The cut of an upstream that writes on past the request's ``max_tokens`` (a misbehaving
engine or proxy that ignores it): the replica stops reading and closes the upstream's
connection, so that the provider stops generating, and the answer ends as one cut by length.

Only the answer's visible output counts towards the cut: its text and its tool calls' names
and arguments. A model's thinking does not: some providers place it outside ``max_tokens``
(DeepSeek's deepseek-reasoner, SiliconFlow's reasoning endpoints) and bill it as output, so a
long chain of thought is no runaway. The cut comes a margin past ``max_tokens``
(``cut_at``: a quarter more, at least 64 tokens more) that covers our tokenizer's difference
from the provider's, so that an answer a provider ends at ``max_tokens`` is never cut.

Counting stays linear in the answer's length: a token is at least one UTF-8 byte, so the
visible output is counted again only once the bytes written since its last count could take
it past the cut."""

from __future__ import annotations

from collections.abc import Callable

from services.model.providers.progress import Progress

CUT_SHARE_NUM, CUT_SHARE_DEN = 5, 4  # a quarter past max_tokens ...
CUT_SLACK_TOKENS = 64  # ... and at least this many tokens past it


def cut_at(max_tokens: int) -> int:
    """The visible output tokens (by our count) past which an answer of ``max_tokens`` is
    cut: max(ceil(max_tokens * 1.25), max_tokens + 64); e.g. 114 for 50, 1,280 for 1,024."""
    share = -(-max_tokens * CUT_SHARE_NUM // CUT_SHARE_DEN)
    return max(share, max_tokens + CUT_SLACK_TOKENS)


class OutputCut:
    """Whether a call's visible output has passed ``cut_at(max_tokens)``, by ``count`` (the
    row's tokenizer's)."""

    def __init__(self, max_tokens: int, count: Callable[[str], int]) -> None:
        self.limit = cut_at(max_tokens)
        self._count = count
        self.counted = 0  # the visible output's tokens at its last count
        self._counted_bytes = 0  # and its bytes then

    def passed(self, progress: Progress) -> bool:
        """True once ``progress``'s visible output is past the limit."""
        grown = progress.visible_bytes - self._counted_bytes
        if self.counted + grown <= self.limit:
            return False  # no count can be past it yet: each new token took a byte at least
        self.counted = sum(self._count(part) for part in progress.visible() if part)
        self._counted_bytes = progress.visible_bytes
        return self.counted > self.limit
