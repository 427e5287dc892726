"""Labelled question pairs in the formats of ``../shared/data/paraphrase/``, split once.

Three layouts are read: ``text_a,text_b,label`` (csv), ``id,sentence1,sentence2,label``
(tsv) and ``origin,similar`` (csv, every pair a positive). Every file is split once,
deterministically, into a fit half and a report half by the sha256 of the pair's first
question, so the same first question never lands in both halves.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Half = Literal["fit", "report"]


@dataclass(frozen=True)
class Pair:
    first: str  # the question whose answer is cached
    second: str  # the question that may be served that answer
    label: bool  # True = same meaning


@dataclass(frozen=True)
class PairsFile:
    name: str  # the file's stem
    pairs: tuple[Pair, ...]
    all_positive: bool  # the origin,similar layout: no negatives in the file

    def half(self, which: Half) -> tuple[Pair, ...]:
        return tuple(p for p in self.pairs if half_of(p) == which)


class DatasetError(ValueError):
    """The file's header is none of the known layouts, or a row is malformed."""


def half_of(pair: Pair) -> Half:
    digest = hashlib.sha256(pair.first.encode("utf-8")).digest()
    return "fit" if digest[0] % 2 == 0 else "report"


def load_pairs(path: Path) -> PairsFile:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as handle:
        reader = (
            csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            if delimiter == "\t"
            else csv.DictReader(handle)
        )
        fields = set(reader.fieldnames or ())
        if {"text_a", "text_b", "label"} <= fields:
            a, b, label = "text_a", "text_b", "label"
        elif {"sentence1", "sentence2", "label"} <= fields:
            a, b, label = "sentence1", "sentence2", "label"
        elif {"origin", "similar"} <= fields:
            a, b, label = "origin", "similar", ""
        else:
            raise DatasetError(f"{path}: unknown header {sorted(fields)}")
        pairs = tuple(_pair(row, a, b, label, path, n) for n, row in enumerate(reader, 2))
    if not pairs:
        raise DatasetError(f"{path}: no pairs")
    return PairsFile(path.stem, pairs, all_positive=not label)


def _pair(row: dict[str, str], a: str, b: str, label: str, path: Path, line: int) -> Pair:
    first, second = (row.get(a) or "").strip(), (row.get(b) or "").strip()
    if not first or not second:
        raise DatasetError(f"{path}:{line}: an empty question")
    if not label:
        return Pair(first, second, True)
    value = (row.get(label) or "").strip()
    if value not in ("0", "1"):
        raise DatasetError(f"{path}:{line}: label must be 0 or 1, got {value!r}")
    return Pair(first, second, value == "1")
