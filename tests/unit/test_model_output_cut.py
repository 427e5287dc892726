"""``OutputCut``: where a provider replica cuts an upstream writing past max_tokens (visible
output, a margin past it: narrow where our tokenizer is the provider's, wide elsewhere) or
past the row's max_output_tokens (thinking included), and that it counts the output rarely
(geometrically spaced counts, and a runaway of few tokens a byte cut by its pieces)."""

from __future__ import annotations

import pytest

from services.common.models import load_model_table
from services.common.tokens import load_vocabulary
from services.model.providers.output_cut import OutputCut, cut_at, exact_tokenizer
from services.model.providers.progress import Progress

TABLE = load_model_table()


def test_the_cut_is_a_quarter_or_64_tokens_past_where_our_tokenizer_is_the_providers() -> None:
    assert [cut_at(n, exact=True) for n in (1, 16, 50, 256, 257, 1024, 4096)] == [
        65,
        80,
        114,
        320,
        322,
        1280,
        5120,
    ]


def test_the_cut_is_four_times_and_64_tokens_past_elsewhere() -> None:
    assert [cut_at(n, exact=False) for n in (1, 50, 1024, 16384)] == [68, 264, 4160, 65600]


@pytest.mark.parametrize(
    ("row", "exact"),
    [
        ("gpt-4o-mini", True),  # OpenAI: its model's own vocabulary (o200k_base)
        ("gpt-5", True),
        ("claude-sonnet-4-5", False),  # Claude's tokenizer is not public: cl100k estimates it
        ("llama-3-1-8b-vllm", False),  # the engine's tokenizer (Llama 3's), not cl100k
    ],
)
def test_the_margin_is_narrow_only_where_the_rows_tokenizer_is_its_providers(
    row: str, exact: bool
) -> None:
    assert exact_tokenizer(TABLE.models[row]) is exact


class Words:
    """A count of one token a word, recording each text it counted."""

    def __init__(self) -> None:
        self.counted: list[int] = []

    def __call__(self, text: str) -> int:
        self.counted.append(len(text))
        return len(text.split())


def test_visible_output_past_the_cut_passes_it_and_thinking_does_not() -> None:
    words = Words()
    cut = OutputCut(16, 16384, words, exact=True)  # at 80
    progress = Progress("r1", "openai", 10, count=Words())
    for _ in range(500):
        progress.reasoning("thinking ")
    assert not cut.passed(progress)
    for n in range(80):
        progress.text("word ")
        assert not cut.passed(progress), n
    progress.tool_piece("more")
    assert cut.passed(progress) and cut.fired is cut.visible and cut.visible.tokens == 81


def test_the_whole_output_past_max_output_tokens_passes_it_thinking_included() -> None:
    words = Words()
    cut = OutputCut(16, 1000, words, exact=True)  # the whole output at 1,250
    progress = Progress("r1", "openai", 10, count=Words())
    progress.text("Paris.")
    thought = 0
    while not cut.passed(progress) and thought < 5000:
        progress.reasoning("one more thought ")  # 3 words a piece
        thought += 3
    # past it by less than the counts' spacing (an eighth of the limit here)
    assert cut.fired is cut.whole and 1250 < cut.whole.tokens == thought + 1 <= 1250 + 1250 // 8


def test_output_within_its_bytes_is_never_counted() -> None:
    words = Words()
    cut = OutputCut(50, 16384, words, exact=True)
    progress = Progress("r1", "openai", 10, count=Words())
    for _ in range(114):
        progress.text("x")
        assert not cut.passed(progress)
    assert words.counted == []  # 114 bytes can hold no more than 114 tokens


def test_a_long_answer_is_counted_a_few_times_not_once_a_piece() -> None:
    words = Words()
    cut = OutputCut(4096, 16384, words, exact=True)  # at 5,120
    progress = Progress("r1", "openai", 10, count=Words())
    pieces = 0
    while not cut.passed(progress):
        progress.text("word ")  # 5 bytes a token
        pieces += 1
    assert pieces == 5121
    # counted again only once the bytes since could hold the tokens left to the cut
    assert len(words.counted) < 40, len(words.counted)


def test_a_whitespace_runaway_is_cut_by_its_pieces_after_few_counts() -> None:
    """A JSON-mode runaway of whitespace (32 spaces a piece: a few tokens in 32 bytes, where
    each count of the whole run is costly): cut once its pieces pass the cut, its counts
    geometrically spaced. Before: counted again at every piece past the first 1,280 bytes
    (6,000 pieces at max_tokens 1,024: 18.4 s of CPU, the event loop stalled for 11.8 s)."""
    o200k = load_vocabulary("o200k_base")
    calls: list[int] = []

    def count(text: str) -> int:
        calls.append(len(text))
        return o200k.count_once(text)

    cut = OutputCut(1024, 16384, count, exact=True)  # at 1,280
    progress = Progress("r1", "openai", 10)
    progress.text('{"a": 1')
    pieces = 1
    while not cut.passed(progress) and pieces < 6001:
        progress.text(" " * 32)
        pieces += 1
    assert cut.fired is cut.visible and pieces == 1281  # one a provider token at least
    assert len(calls) <= 32, len(calls)  # was 39,000 counts and more
    assert sum(calls) <= 12 * progress.visible_bytes  # each count's bytes: linear in all
