"""The cut of an upstream that writes on past what it may write (a misbehaving engine or proxy
that ignores ``max_tokens``, a model thinking forever): the replica stops reading and closes
the upstream's connection, so that the provider stops generating, and the answer ends as one
cut by length.

Two limits, each a margin past what the provider may write (``cut_at``):

- the answer's visible output (its text and its tool calls' names and arguments) past the
  request's ``max_tokens``. Thinking does not count towards this one: some providers place it
  outside ``max_tokens`` (DeepSeek's deepseek-reasoner, SiliconFlow's reasoning endpoints) and
  bill it as output, so a long chain of thought is no runaway of the answer;
- the whole output, thinking included, past the row's ``max_output_tokens``: what no call of
  the model can write, so a model thinking forever is cut too.

The margin covers our tokenizer's difference from the provider's, so that an answer a provider
ends at its limit is never cut. Where our tokenizer is the provider's own (``exact_tokenizer``:
an OpenAI row, counted with its model's vocabulary) it is narrow: a quarter more, at least 64
tokens more. Elsewhere (a self-hosted engine's tokenizer, Claude's, neither of them ours) our
count of a non-English answer runs far above the provider's (Hindi about 3.2 times o200k's by
cl100k), so it is wide: four times the limit and 64 tokens more; only a real runaway is cut.

Each limit is passed once the larger of two figures is past it: our count of the output, and
the output's non-empty pieces (each delta a provider streams is at least one of its tokens: a
cheap, exact lower bound, which cuts a runaway whose bytes are many a token, e.g. a JSON-mode
run of whitespace, without counting it). Our count is made again only once the bytes written
since its last count could take it past the limit (a token is at least one UTF-8 byte) and
have grown by an eighth of the limit and an eighth of the bytes counted: geometrically spaced
(the first count comes past ``limit`` bytes, each next one at 9/8 of the last's bytes at least),
so an output of n bytes is counted at most about 1 + 8.5 * ln(n / limit) times, the bytes of all
its counts together at most about 9 * n. A count's cost per byte is the tokenizer's: about
0.3 us a byte for a long run of whitespace (0.16 s for 512 KB), which the pieces' bound stops
early when it comes in many pieces. Before, a count came whenever the bytes since the last
could take the count past the limit: once near it, at every piece (quadratic)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from services.common.models import ModelSpec
from services.common.output_count import streamed_output_tokens
from services.model.providers.progress import Progress

EXACT_SHARE_NUM, EXACT_SHARE_DEN = 5, 4  # our tokenizer is the provider's: a quarter more ...
CUT_SLACK_TOKENS = 64  # ... and at least this many tokens past it (and past the wide margin)
WIDE_FACTOR = 4  # our tokenizer is not the provider's: four times the limit, 64 tokens more
RECOUNT_SHARE = 8  # a count is made again once the bytes grew by an eighth (limit, counted)


def exact_tokenizer(spec: ModelSpec) -> bool:
    """Whether our count of ``spec``'s output is its provider's: an OpenAI row, whose
    ``tokenizer`` is its model's own vocabulary (o200k_base for gpt-4o and later, cl100k_base
    before). A self-hosted engine's tokenizer (Llama's, Qwen's, ...) and Claude's are not
    ours: cl100k_base only estimates them."""
    return spec.provider == "openai"


def cut_at(limit: int, *, exact: bool) -> int:
    """The output tokens (by our count) past which an output of at most ``limit`` tokens is
    cut. ``exact`` (``exact_tokenizer``): max(ceil(limit * 1.25), limit + 64), e.g. 114 for
    50, 1,280 for 1,024; else limit * 4 + 64, e.g. 264 for 50, 4,160 for 1,024."""
    if not exact:
        return limit * WIDE_FACTOR + CUT_SLACK_TOKENS
    share = -(-limit * EXACT_SHARE_NUM // EXACT_SHARE_DEN)
    return max(share, limit + CUT_SLACK_TOKENS)


class Gauge:
    """Whether one share of a call's output has passed ``limit`` tokens: by the larger of our
    count (``count``, made again only as the module says) and its non-empty pieces."""

    def __init__(self, limit: int, count: Callable[[str], int]) -> None:
        self.limit = limit
        self._count = count
        self.counted = 0  # the output's tokens at its last count
        self.pieces = 0  # its non-empty pieces when last looked at
        self._counted_bytes = 0  # its bytes at its last count

    @property
    def tokens(self) -> int:
        """The output's tokens as far as known: the larger of our count and its pieces."""
        return streamed_output_tokens(self.counted, self.pieces)

    def passed(self, parts: Callable[[], Iterable[str]], size: int, pieces: int) -> bool:
        """True once the output (``parts``, of ``size`` UTF-8 bytes in ``pieces`` non-empty
        pieces) is past the limit."""
        self.pieces = pieces
        if pieces > self.limit:
            return True  # a piece is at least one provider token: no count needed
        grown = size - self._counted_bytes
        step = max(
            self.limit - self.counted,  # no count can be past it before: a token takes a byte
            self.limit // RECOUNT_SHARE,
            self._counted_bytes // RECOUNT_SHARE,
        )
        if grown <= step:
            return False
        self.counted = sum(self._count(part) for part in parts() if part)
        self._counted_bytes = size
        return self.counted > self.limit


class OutputCut:
    """Whether a call's output has passed either limit (the module's): ``visible`` (its text
    and tool calls, at ``cut_at(max_tokens)``) or ``whole`` (thinking too, at
    ``cut_at(max_output_tokens)``), by ``count`` (the row's tokenizer's)."""

    def __init__(
        self, max_tokens: int, max_output_tokens: int, count: Callable[[str], int], *, exact: bool
    ) -> None:
        self.visible = Gauge(cut_at(max_tokens, exact=exact), count)
        self.whole = Gauge(cut_at(max_output_tokens, exact=exact), count)
        self.fired: Gauge | None = None  # the gauge that passed its limit

    def passed(self, progress: Progress) -> bool:
        """True once ``progress``'s output is past either limit (``fired`` says which)."""
        if self.visible.passed(progress.visible, progress.visible_bytes, progress.visible_pieces):
            self.fired = self.visible
        elif self.whole.passed(
            progress.produced, progress.produced_bytes, progress.produced_pieces
        ):
            self.fired = self.whole
        return self.fired is not None
