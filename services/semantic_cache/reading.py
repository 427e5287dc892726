"""What the models can read of the two questions a non-exact candidate pairs.

DESIGN.md, "What a cache hit may serve": a wrong answer is worse than a miss, so a candidate is
refused when the embedding and the verifier cannot see what tells the two questions apart.

- **[UNK]**: the embedder and the cross-encoder share one tokenizer (bert-base-uncased's
  vocabulary). What it lacks (most CJK, all Thai, emoji) it reads as ``[UNK]``: "如何删除我的账户"
  (delete my account) and "如何创建我的账户" (create my account) are the same tokens to both
  models, cosine 1.0, and the cross-encoder accepted them (p 0.93-0.996); so were "👍" and "👎".
  ``Reader.unknown`` gives the substrings a text's ``[UNK]`` tokens stand for (the tokenizer's
  offsets): a candidate is served only when the two questions' are the same, in order.
- **A shared opening**: the cross-encoder reads at most ``pair_tokens`` (64) of the pair,
  truncated longest first, and the embedding the first 256 tokens of a question; two questions
  after the same preamble, context or document ("... I pay monthly by card. How do I enable
  2FA?" / "... disable 2FA?") were read as their shared part only, and served. So the verifier
  reads them without the leading sentences they share word for word (``differing``), and a
  pair whose truncated reading still holds nothing past their common opening is refused (a
  long pair that differs early, as paraphrases do, is read as it was: refusing every pair over
  64 tokens cost 34 points of recall on the project's FAQ data, which it served 171 right to 1
  wrong); as is a question longer than the embedding reads whose differing part the verifier
  cannot read in full when the verifier does not run. A pair that shares no leading sentence
  is read exactly as before (the verifier's calibration still holds).
- **What the tokenizer folds away** (``folding_refusal``): it lowercases and reads any run of
  whitespace as one break, and the exact-match key keeps both (``query.normalise``). "What
  does `ls -L` do?" / "`ls -l`", "the type of True" / "true", "500 MB" / "500 Mb", Python
  whose indentation moved, "print('A B')" / "print('A    B')" were served as exact hits on a
  lowercased, whitespace-collapsed key. Texts equal up to case and spacing (``query.folded``)
  are compared token by token: a word may differ in its first letter where it opens a
  sentence, as the pronoun "I", or Capitalised or in capitals against a question written all
  in lowercase, but a function word in capitals is a name on any pair ("IT" / "it":
  ``capitals.py``); a token with a digit or a symbol not at all; the spacing only between words,
  outside a quoted or code span, never in a line break or an indentation. Other pairs are
  held only to the spans and lines both hold (a word's case between paraphrases is left to
  the models: users write proper nouns in lowercase).
- **Accents**: the tokenizer strips them: "zahlen" / "zählen" (pay / count), "papá" / "papa"
  had cosine 1.0 and the cross-encoder's consent. The differing parts' same token ids for
  other text (``ACCENTS``), or a word in both spelt with other accents, are refused.
- **Operators and signs** (``operators``): the lexical features drop them and the
  cross-encoder barely weighs them ("2 + 2" / "2 * 2": p 0.98); the differing parts must hold
  the same ones, in order (``SYMBOLS``).
- **Numbers** (``number_conflict``): a number on each side that the other lacks ("0.5 mg" /
  "5 mg", "two tips" / "five tips": number words are read as digits) only lowered the
  verifier's probability (the shipped weights list no veto): refused (``NUMBERS``).
- **un-** (``un_prefixed``): a word of one question that is "un" and a word of the other
  ("hide" / "unhide") is refused (``OPPOSITE``).
- **Sides swapped** (``swapped``): the same words with the two sides of "than", "to",
  "from"... exchanged ("Is C++ faster than C?" / "Is C faster than C++?"), or of "in" after
  "how many" ("ounces in a pound" / "pounds in an ounce"), are refused (``SWAPPED``): the
  lexical features see the same words, the cross-encoder barely a symbol.
- **Answer shapes** (``shape_conflict``): both questions ask for an answer of a given
  length, detail or layout, and not the same ("Explain recursion in one sentence" / "...
  in detail", "briefly" / "in depth", "as a table" / "as a numbered list"): refused
  (``SHAPE``). A data format is a layout only where the answer is asked in it ("answer in
  JSON"), not where it is the subject ("write my config file in YAML or JSON?").
- **Opposites** (``opposites``): a word of one question whose opposite (a short hand-written
  list, ``_OPPOSITE_PAIRS``) the other has, "ascending" / "descending", "horizontally" /
  "vertically", is refused (``ANTONYMS``) unless one of the two is negated ("not good" /
  "bad").

The checks live beside this module: ``folding`` (what the tokenizer folds away: case, spacing,
accents) and ``contrasts`` (operators, numbers, un-, opposites, swapped sides, answer shapes).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from services.semantic_cache.contrasts import (
    number_conflict,
    operators,
    opposites,
    shape_conflict,
    swapped,
    un_prefixed,
)
from services.semantic_cache.cross_encoder import CrossEncoderInfo, longest_first
from services.semantic_cache.embedder import (
    MAX_TOKENS,
    TOKENIZER_SHA256,
    checked_file,
    default_tokenizer_path,
    embedding_input,
)
from services.semantic_cache.folding import ACCENTS, Folding, folding_refusal
from services.semantic_cache.query import KEYED_CHARS

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

UNREADABLE = (
    "unreadable: the questions differ in characters the models read as [UNK] (outside their"
    " vocabulary: most CJK, Thai, emoji)"
)
TOO_LONG = "too long: the verifier cannot read in full where the two questions differ"
SYMBOLS = (
    "symbols: the questions differ in their operators or signs (+ - * / = < > ! ^ % & | $ € £"
    " #...), which the verifier does not weigh"
)
NUMBERS = "numbers: the questions hold different numbers (0.5 mg / 5 mg)"
OPPOSITE = "opposite: one question has a word the other has with un- before it (hide / unhide)"
ANTONYMS = (
    "opposite: one question has a word whose opposite the other has (ascending / descending,"
    " horizontally / vertically)"
)
SWAPPED = (
    "swapped: the questions hold the same words with the two sides of than, to, from..."
    " exchanged (C++ faster than C / C faster than C++)"
)
SHAPE = (
    "shape: the questions ask for answers of another length, detail or layout (in one"
    " sentence / in detail, briefly / in depth, as a table / as a list)"
)
# A sentence ends at ., ! or ? followed by whitespace and more text.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
# A sentence's end, or a line's (a shared ending is read by sentences and lines): a run of
# whitespace with a line break in it, before more text. Linear: a line's end is tried only where
# a run of whitespace begins, and its tail is never given back ("\s*\n\s*(?=\S)", the same
# spans, tried a match from every space of a run to the run's end: a question + 64,000 spaces
# + "!" took 7-9 s, held a lookup's verifier thread and every tenant's lookups behind it).
_PART_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<!\s)[^\S\n]*\n\s*+(?=\S)")
# The longest text the reader reads (4 x the longest question stored, the exact key's limit):
# a pair with a longer one is refused unread (``TOO_LONG``): its differing part is longer than
# the embedding (256 tokens) or the cross-encoder (64) reads, and every check reads it all.
MAX_READ_CHARS = KEYED_CHARS
# The most tokens one character becomes (a Hangul syllable: three jamo; measured over every
# code point): a text of at most (MAX_TOKENS - 2) // 3 characters is never truncated.
_MAX_TOKENS_A_CHAR = 3


def differing(first: str, second: str) -> tuple[str, str]:
    """The two texts from their first differing sentence on: the leading sentences they share
    word for word are dropped (each text keeps at least its last sentence); so are the
    trailing sentences or lines they share when those are longer than what differs (each
    text keeps at least one): "Summarise the report below. Report: <a document>" / "Translate the
    report below into French. Report: <the same>" were read as the document they share,
    cosine 0.95, and served. A shorter shared ending ("hi, I pay by card. How do I enable
    2FA?" / "hello, ...") is read as before, so the verifier's calibration holds for such
    pairs. Texts with nothing dropped come back as they are (the same objects)."""
    start_a = start_b = 0
    for end_a, end_b in zip(
        _SENTENCE_END.finditer(first), _SENTENCE_END.finditer(second), strict=False
    ):
        if first[start_a : end_a.start()] != second[start_b : end_b.start()]:
            break
        start_a, start_b = end_a.end(), end_b.end()
    stop_a, stop_b = _shared_ending(first, second, start_a, start_b)
    if len(first) - stop_a <= (stop_a - start_a) + (stop_b - start_b):
        stop_a, stop_b = len(first), len(second)  # it does not outweigh what differs
    if start_a == 0 and stop_a == len(first):
        return first, second
    return first[start_a:stop_a], second[start_b:stop_b]


def _shared_ending(first: str, second: str, start_a: int, start_b: int) -> tuple[int, int]:
    """Where the two texts' trailing sentences or lines shared word for word begin (their
    ends when none is), past ``start_a`` and ``start_b`` and leaving each at least one: a
    document after a question is often lines (code, JSON, a table) with no sentence end."""
    ends_a = [m for m in _PART_END.finditer(first) if m.end() > start_a]
    ends_b = [m for m in _PART_END.finditer(second) if m.end() > start_b]
    stop_a, stop_b = len(first), len(second)
    while ends_a and ends_b:
        last_a, last_b = ends_a.pop(), ends_b.pop()
        if first[last_a.end() : stop_a] != second[last_b.end() : stop_b]:
            break
        stop_a, stop_b = last_a.start(), last_b.start()
    return stop_a, stop_b


def _squashed(text: str) -> str:
    """``text`` lowercase, without whitespace, composed (NFC)."""
    return "".join(unicodedata.normalize("NFC", text).lower().split())


@dataclass(frozen=True)
class Reading:
    """What the verifier reads of a pair, or why it cannot (``refusal``)."""

    first: str
    second: str
    dropped: bool  # shared leading sentences were dropped: the cosine must be these two's
    refusal: str = ""


class Reader:
    """The shared tokenizer, untruncated and unpadded (thread-safe: it is only read), and how
    much of a text or a pair each model reads."""

    def __init__(self, tokenizer: Tokenizer, pair_tokens: int, embed_tokens: int = MAX_TOKENS):
        self._tokenizer = tokenizer
        self._unk = tokenizer.token_to_id("[UNK]")
        self.pair_tokens = pair_tokens  # the cross-encoder's, [CLS] and both [SEP] included
        self.embed_tokens = embed_tokens  # the embedder's, [CLS] and [SEP] included

    def unknown(self, text: str) -> tuple[str, ...]:
        """The substrings of ``text`` the tokenizer reads as ``[UNK]``, in order."""
        return self._unknown(text, self._encode(text))

    def sees_the_difference(self, first: str, second: str) -> bool:
        """The cross-encoder reads, of each text, more than the opening the two share: it reads
        ``[CLS] first [SEP] second [SEP]`` truncated longest-first to ``pair_tokens``, so two
        long texts that differ only after a long common opening ("<long context> so how do I
        enable X?" / "... disable X?") are read as their identical openings. A long pair that
        differs early (most paraphrases) is read as before: its calibration holds."""
        return self._sees(first, second, self._encode(first), self._encode(second))

    def _encode(self, text: str) -> Encoding:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def _unknown(self, text: str, encoding: Encoding) -> tuple[str, ...]:
        return tuple(
            text[start:end]
            for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
            if token == self._unk
        )

    def _sees(self, first: str, second: str, first_enc: Encoding, second_enc: Encoding) -> bool:
        shared = next(
            (i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y),
            min(len(first), len(second)),
        )  # the characters of the opening both share
        if shared == 0:
            return True
        ends_a = [end for _, end in first_enc.offsets]
        ends_b = [end for _, end in second_enc.offsets]
        keep_a, keep_b = longest_first(len(ends_a), len(ends_b), self.pair_tokens - 3)
        # each text is read in full, or past the opening both share
        return all(
            keep == len(ends) or (keep and ends[keep - 1] > shared)
            for keep, ends in ((keep_a, ends_a), (keep_b, ends_b))
        )

    def truncated(self, text: str) -> bool:
        """The embedding reads only part of ``text`` (more than ``embed_tokens`` tokens, or
        more than the embedder tokenises: ``embedding_input``)."""
        if len(text) * _MAX_TOKENS_A_CHAR <= self.embed_tokens - 2:
            return False
        given, left_out = embedding_input(text)
        return left_out or len(self._tokenizer.encode(given).ids) > self.embed_tokens

    def read(
        self,
        first: str,
        second: str,
        *,
        cross_encoder: bool,
        scored: bool,
        folding: Folding | None = None,
    ) -> Reading:
        """What the verifier reads of (cached, new): their differing parts, unless it cannot
        read them in full (``cross_encoder``: its weights use it; ``scored``: the step is on)
        or they differ in ``[UNK]`` text, in what the tokenizer drops (the same tokens for
        other text: accents) or folds away (``folding_refusal``), in their operators and
        signs (``operators``), or hold different numbers (``number_conflict``), a word and
        its un- form (``un_prefixed``) or its opposite (``opposites``), or the same words on
        the other sides of a one-way word (``swapped``), or ask for answers of other shapes
        (``shape_conflict``). ``folding``: ``second``'s, when it is read against several
        texts. A text longer than ``MAX_READ_CHARS`` is not read: ``TOO_LONG``."""
        if max(len(first), len(second)) > MAX_READ_CHARS:
            return Reading(first, second, False, TOO_LONG)
        a, b = differing(first, second)
        dropped = len(a) < len(first)  # a is a part of first
        a_enc, b_enc = self._encode(a), self._encode(b)  # once each, for both checks
        if cross_encoder and scored:
            if not self._sees(a, b, a_enc, b_enc):
                return Reading(a, b, dropped, TOO_LONG)
        elif (self.truncated(first) or self.truncated(second)) and (
            not scored or self.truncated(a) or self.truncated(b)
        ):
            return Reading(a, b, dropped, TOO_LONG)
        if self._unknown(a, a_enc) != self._unknown(b, b_enc):
            return Reading(a, b, dropped, UNREADABLE)
        if a_enc.ids == b_enc.ids and _squashed(a) != _squashed(b):
            return Reading(a, b, dropped, ACCENTS)  # what differs, the tokenizer drops
        if refusal := folding_refusal(first, folding or second):
            return Reading(a, b, dropped, refusal)
        if operators(a) != operators(b):
            return Reading(a, b, dropped, SYMBOLS)
        if number_conflict(a, b):
            return Reading(a, b, dropped, NUMBERS)
        if un_prefixed(a, b):
            return Reading(a, b, dropped, OPPOSITE)
        if opposites(a, b)[0]:
            return Reading(a, b, dropped, ANTONYMS)
        if swapped(a, b):
            return Reading(a, b, dropped, SWAPPED)
        if shape_conflict(a, b):
            return Reading(a, b, dropped, SHAPE)
        return Reading(a, b, dropped)


def load_reader(tokenizer_path: Path | None = None) -> Reader:
    """The pinned tokenizer (sha256-checked), with the shipped cross-encoder's pair length."""
    from tokenizers import Tokenizer

    path = checked_file(
        tokenizer_path or default_tokenizer_path(), TOKENIZER_SHA256, "tokenizer.json"
    )
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return Reader(tokenizer, CrossEncoderInfo.load().max_tokens)


@cache
def shipped_reader() -> Reader:
    """``load_reader()`` once per process."""
    return load_reader()
