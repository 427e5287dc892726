"""``OutputCut``: where a provider replica cuts an upstream writing past max_tokens (visible
output only, a margin past it) and that it counts the output rarely (linear in its length)."""

from __future__ import annotations

from services.model.providers.output_cut import OutputCut, cut_at
from services.model.providers.progress import Progress


def test_the_cut_is_a_quarter_or_64_tokens_past_max_tokens() -> None:
    assert [cut_at(n) for n in (1, 16, 50, 256, 257, 1024, 4096)] == [
        65,
        80,
        114,
        320,
        322,
        1280,
        5120,
    ]


class Words:
    """A count of one token a word, recording each text it counted."""

    def __init__(self) -> None:
        self.counted: list[int] = []

    def __call__(self, text: str) -> int:
        self.counted.append(len(text))
        return len(text.split())


def test_visible_output_past_the_cut_passes_it_and_thinking_does_not() -> None:
    words = Words()
    cut = OutputCut(16, words)  # at 80
    progress = Progress("r1", "openai", 10, count=Words())
    for _ in range(500):
        progress.reasoning("thinking ")
    assert not cut.passed(progress) and words.counted == []  # never counted
    for n in range(80):
        progress.text("word ")
        assert not cut.passed(progress), n
    progress.tool_piece("more")
    assert cut.passed(progress) and cut.counted == 81


def test_output_within_its_bytes_is_never_counted() -> None:
    words = Words()
    cut = OutputCut(50, words)
    progress = Progress("r1", "openai", 10, count=Words())
    for _ in range(114):
        progress.text("x")
        assert not cut.passed(progress)
    assert words.counted == []  # 114 bytes can hold no more than 114 tokens


def test_a_long_answer_is_counted_a_few_times_not_once_a_piece() -> None:
    words = Words()
    cut = OutputCut(4096, words)  # at 5,120
    progress = Progress("r1", "openai", 10, count=Words())
    pieces = 0
    while not cut.passed(progress):
        progress.text("word ")  # 5 bytes a token
        pieces += 1
    assert pieces == 5121
    # counted again only once the bytes since could hold the tokens left to the cut
    assert len(words.counted) < 40, len(words.counted)
