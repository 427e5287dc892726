"""What the verifier reads of a long question is bounded: the sentence-and-line split of
``reading.differing`` is linear in the text, and the reader does not read a text longer than
``MAX_READ_CHARS`` at all (a question + 48,000 spaces + "!" held a lookup 19-22 s)."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from services.semantic_cache import reading
from services.semantic_cache.reading import MAX_READ_CHARS, TOO_LONG, shipped_reader

# the split as written before it was made linear: what each of its ends spans
_READABLE = re.compile(r"(?<=[.!?])\s+(?=\S)|\s*\n\s*(?=\S)")


def test_the_part_ends_are_the_readable_patterns_spans() -> None:
    picks = random.Random(3)
    alphabet = ["a", "b", ".", "!", "?", " ", "  ", "\n", "\n\n", "\t", "\r", "\u2028", "\xa0"]
    for _ in range(5_000):
        text = "".join(picks.choice(alphabet) for _ in range(picks.randint(0, 24)))
        spans = [m.span() for m in reading._PART_END.finditer(text)]
        assert spans == [m.span() for m in _READABLE.finditer(text)], repr(text)


def test_differing_reads_a_million_spaces_in_linear_time() -> None:
    # the old split tried every space as a start and ran to the run's end from each: 64,000
    # spaces took 7-9 s, a million would take ~40 minutes; linear, well under a second
    script = (
        "from services.semantic_cache.reading import differing\n"
        "q = 'What is the capital of France?'\n"
        "print(len(differing(q, q + ' Thanks' + ' ' * 1_000_000 + '!')[1]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == str(1_000_000 + 38)


def test_a_text_longer_than_the_reader_reads_is_too_long_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = shipped_reader()
    question = "What is the capital of France?"

    def unread(first: str, second: str) -> tuple[str, str]:
        raise AssertionError("differing read a text over MAX_READ_CHARS")

    monkeypatch.setattr(reading, "differing", unread)
    for first, second in (
        (question, question + " " * MAX_READ_CHARS + "!"),
        (question + " " * MAX_READ_CHARS + "!", question),
    ):
        got = reader.read(first, second, cross_encoder=True, scored=True)
        assert got.refusal == TOO_LONG
        assert not got.dropped
