"""What the tokenizer folds away, which the models cannot read: a word's case, spacing (within
a quoted or code span, a line break, an indentation), a function word in capitals, accents
(``folding_refusal``; ``reading`` explains each).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator
from functools import cached_property

from services.semantic_cache.capitals import function_word_forms
from services.semantic_cache.query import folded
from services.semantic_cache.words import LEADING, LETTERS, TRAILING

CASE_OR_SPACING = (
    "unreadable: the questions differ in letter case or spacing the models do not read (a"
    " word's case past a sentence's first letter, a quoted or code span, a line's indentation)"
)
NAMED = (
    "unreadable: a function word is written in capitals in one question and not in the other"
    ' (a name: "IT", "US", "WHO" are not "it", "us", "who"), which the models do not read'
)
ACCENTS = (
    "unreadable: the questions differ in accents or characters the models do not read (their"
    " tokenizer strips accents: zahlen / zählen, papa / papá)"
)


# What may stand between a sentence's end (or the text's start, or a line break) and its
# first word: spaces, opening quotes and brackets, inverted marks, a bullet.
_OPENERS = frozenset("\"'“”\u2018\u2019«»([{¿¡•>")
_SENTENCE_ENDS = frozenset(".!?:;")
# A quoted or code span within a line (a fenced block is found by splitting on its fences):
# `code`, '...' and "..." not inside a word (an apostrophe is none), “...”, «...».
_QUOTED = re.compile(
    r"`[^`\n]*`"
    r"|(?<![^\W_])'[^'\n]*'(?![^\W_])"
    r"|(?<![^\W_])\"[^\"\n]*\"(?![^\W_])"
    r"|“[^”\n]*”"
    r"|«[^»\n]*»"
)
# Its openers that are not their closers: one left open would be followed to its line's end.
_UNCLOSED = (("“", "”"), ("«", "»"))
_TOKEN = re.compile(r"\S+")


def _starts_sentence(text: str, start: int) -> bool:
    """The word at ``start`` opens the text, a line or a sentence (what precedes it, past
    spaces and openers, is a line break or ., !, ?, :, ;)."""
    i = start - 1
    while i >= 0:
        char = text[i]
        if char == "\n":
            return True
        if not (char.isspace() or char in _OPENERS):
            return char in _SENTENCE_ENDS
        i -= 1
    return True


def _spans(text: str) -> Iterator[tuple[int, int]]:
    """Where the fenced code blocks (an unclosed one runs to the end) and the quoted or code
    spans are: (start, end) offsets, fences and quotes included."""
    offset = 0
    for i, part in enumerate(text.split("```")):
        if i % 2:
            yield offset - 3, min(len(text), offset + len(part) + 3)
        else:
            found = _QUOTED.finditer(_closed_only(part))
            yield from ((offset + m.start(), offset + m.end()) for m in found)
        offset += len(part) + 3


def _closed_only(text: str) -> str:
    """``text`` with each “ or « that no ” or » follows on its line made a space (the same
    length: the offsets hold), which ``_QUOTED`` reads the same way (no span opens there,
    and either is a character a span may hold). ``_QUOTED`` alone looked for the closer from
    every such opener to the line's end: quadratic in one regex call, a 150 kB line of
    "« « « ..." read for 13 s, the GIL held."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        for opener, closer in _UNCLOSED:
            cut = line.rfind(closer) + 1  # past the line's last closer, none closes
            if opener in line[cut:]:
                line = line[:cut] + line[cut:].replace(opener, " ")
        lines[i] = line
    return "\n".join(lines)


def _inside_spans(text: str) -> bytearray:
    """Per character of ``text``, 1 when it lies within a quoted or code span."""
    inside = bytearray(len(text))
    for start, end in _spans(text):
        inside[start:end] = b"\x01" * (end - start)
    return inside


def _case_allowed(a: str, b: str, start: tuple[bool, bool], casual: tuple[bool, bool]) -> bool:
    """Two tokens equal but for letter case may stand for each other: words of letters only
    that differ in their first letter where either opens a sentence, the pronoun "I", or a
    Capitalised or ALL-CAPS word beside a question written all in lowercase ("flights rome
    to chicago")."""
    core_a, core_b = a.lstrip(LEADING).rstrip(TRAILING), b.lstrip(LEADING).rstrip(TRAILING)
    if not LETTERS.fullmatch(core_a):  # one with a digit or a symbol must match exactly
        return False
    pronoun = core_a.lower().replace("\u2019", "'").split("'")[0] == "i"
    if core_a[1:] == core_b[1:] and (any(start) or pronoun):
        return True
    for word, other, lowercase in ((core_a, core_b, casual[1]), (core_b, core_a, casual[0])):
        if lowercase and other.islower() and (word.isupper() or word[1:].islower()):
            return True
    return False


def _case_or_spacing(a: str, b: str) -> bool:
    """Texts equal up to case and spacing (``query.folded``) that differ in a way that can
    change their meaning: a word's case other than as ``_case_allowed`` says, the spacing
    within a quoted or code span, a line break or a line's indentation."""
    tokens_a, tokens_b = list(_TOKEN.finditer(a)), list(_TOKEN.finditer(b))
    casual = (not any(c.isupper() for c in a), not any(c.isupper() for c in b))
    inside_a: bytearray | None = None
    inside_b: bytearray | None = None
    for k, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=True)):
        if x.group() != y.group():
            start = (_starts_sentence(a, x.start()), _starts_sentence(b, y.start()))
            if not _case_allowed(x.group(), y.group(), start, casual):
                return True
        if k == 0:
            continue
        before_a = a[tokens_a[k - 1].end() : x.start()]
        before_b = b[tokens_b[k - 1].end() : y.start()]
        if before_a == before_b:
            continue
        if "\n" in before_a or "\n" in before_b:
            if before_a.rpartition("\n")[1:] != before_b.rpartition("\n")[1:]:
                return True  # a line break, or the next line's indentation
            continue
        inside_a = inside_a if inside_a is not None else _inside_spans(a)
        inside_b = inside_b if inside_b is not None else _inside_spans(b)
        if inside_a[x.start() - 1] or inside_b[y.start() - 1]:
            return True
    return False


Forms = dict[str, list[str]]  # per key, the ways a text writes it, in order (no repeats in a row)


def _add(forms: Forms, key: str, form: str) -> None:
    seen = forms.setdefault(key, [])
    if not seen or seen[-1] != form:
        seen.append(form)


def _span_forms(text: str) -> Forms:
    """Per quoted or code span as the tokenizer reads it (lowercase, no whitespace), its
    characters."""
    forms: Forms = {}
    for start, end in _spans(text):
        span = text[start:end]
        _add(forms, "".join(span.split()).lower(), span)
    return forms


def _indents(text: str) -> Forms:
    """Per line as the tokenizer reads it, its indentation."""
    indents: Forms = {}
    for line in text.split("\n"):
        content = line.strip()
        if content:
            key = " ".join(content.split()).lower()
            _add(indents, key, line[: len(line) - len(line.lstrip())])
    return indents


def _accented_forms(text: str) -> Forms:
    """Per word as the tokenizer reads it (lowercase, accents stripped), its spelling."""
    forms: Forms = {}
    for match in LETTERS.finditer(text):
        word = match.group().lower()
        _add(forms, strip_accents(word), word)
    return forms


def strip_accents(text: str) -> str:
    """``text`` without its combining marks, as the tokenizer reads it ("zählen": "zahlen")."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


class Folding:
    """A text as ``folding_refusal`` reads it (composed, its folded key, its forms), each part
    made when first needed, then kept: a Lookup's new question is read against every
    candidate of its shortlist."""

    def __init__(self, text: str) -> None:
        self._given = text
        self._forms: dict[Callable[[str], Forms], Forms] = {}

    @cached_property
    def text(self) -> str:
        return unicodedata.normalize("NFC", self._given)

    @cached_property
    def key(self) -> str:
        return folded(self.text)

    def forms(self, of: Callable[[str], Forms]) -> Forms:
        made = self._forms.get(of)
        if made is None:
            made = self._forms[of] = of(self.text)
        return made


def folding_refusal(first: str | Folding, second: str | Folding) -> str:
    """Why the two texts may not be served for each other although what tells them apart is
    folded away by the tokenizer ("" = nothing such). Texts equal up to case and spacing
    (``query.folded``) are compared word by word (``_case_or_spacing``); others only where the
    models cannot see a difference that is there: a quoted or code span, or a line, found in
    both but written or indented differently, or in another order (``CASE_OR_SPACING``); a
    word found in both with other accents (``ACCENTS``). Linear in the texts' length (a 16 kB
    question is never aligned by edit distance). A ``Folding`` keeps its side for the next
    call."""
    a = first if isinstance(first, Folding) else Folding(first)
    b = second if isinstance(second, Folding) else Folding(second)
    names_a, names_b = a.forms(function_word_forms), b.forms(function_word_forms)
    if any(names_a[key] != names_b[key] for key in names_a.keys() & names_b.keys()):
        return NAMED  # "IT" / "it", "US" / "us", on either path
    if a.key == b.key:
        return CASE_OR_SPACING if _case_or_spacing(a.text, b.text) else ""
    for forms, refusal in (
        (_span_forms, CASE_OR_SPACING),
        (_indents, CASE_OR_SPACING),
        (_accented_forms, ACCENTS),
    ):
        of_a, of_b = a.forms(forms), b.forms(forms)
        if any(of_a[key] != of_b[key] for key in of_a.keys() & of_b.keys()):
            return refusal
    return ""
