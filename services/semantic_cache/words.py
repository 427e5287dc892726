"""What a word of a question is, as the rules that read two questions' words see it: a run of
letters (``LETTERS``), and the punctuation that may stand around one (``LEADING``,
``TRAILING``). Shared by ``folding`` (case and accents), ``capitals`` (function words in
capitals) and ``contrasts`` (un- forms, opposites, negations, bare words)."""

from __future__ import annotations

import re

# A word of letters only, with inner apostrophes ("don't", "I'm"); a token with a digit or
# a symbol ("-L", "Mb/s", "print('A") is none.
LETTERS = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
# Around a word, what is punctuation and not part of it ("True?" is the word "True").
LEADING = "\"'“\u2018«([{¿¡"
TRAILING = ".,;:!?\"'”\u2019»)]}"
