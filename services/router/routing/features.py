"""The shape features of a question: what the router sees besides its embedding.

The same function runs when the model is fitted (on RouteLLM's prompts) and on every request
(on the last user turn), so the two can never disagree. Every feature is a plain property of
the text: its length in characters, words and lines, how much of it is digits, numbers and
arithmetic, whether it lists lettered choices, its mean word length.
"""

from __future__ import annotations

import math
import re

import numpy as np
import numpy.typing as npt

SHAPE_FEATURES = (
    "log_chars",
    "log_words",
    "log_lines",
    "digit_share",
    "log_numbers",
    "math_share",
    "lettered_choices",
    "mean_word_chars",
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MATH = frozenset("+-*/=^<>%$")
# a choice's indent never spans lines: `^\s*` did, and a run of blank lines backtracked in time
# quadratic in its length (10k newlines: 8 s on the event loop, for every tenant)
_CHOICE = re.compile(r"^[^\S\n]*\(?[A-Ja-j][.)]\s", re.MULTILINE)


def shape_features(text: str) -> npt.NDArray[np.float32]:
    chars = len(text)
    words = text.split()
    digits = sum(c.isdigit() for c in text)
    math_chars = sum(c in _MATH for c in text)
    return np.array(
        [
            math.log1p(chars),
            math.log1p(len(words)),
            math.log1p(text.count("\n") + 1 if text else 0),
            digits / chars if chars else 0.0,
            math.log1p(len(_NUMBER.findall(text))),
            math_chars / chars if chars else 0.0,
            min(len(_CHOICE.findall(text)), 10) / 10.0,
            sum(len(w) for w in words) / len(words) if words else 0.0,
        ],
        dtype=np.float32,
    )
