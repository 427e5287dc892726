"""RouteLLM's MMLU + GSM8K correctness labels, split once into a fit half and a report half.

Each row is a prompt and whether the weak model (Mixtral-8x7B) and the strong one
(GPT-4-1106) answered it correctly. The split is by the sha256 of a fixed seed and the prompt,
so it never changes between runs and a prompt never lands in both halves.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Half = Literal["fit", "report"]
DATA = Path("../shared/data/routing/routellm_mmlu_gsm8k_dev.csv")
SPLIT_SEED = "cachemesh.router.split.v1"
_COLUMNS = {"source", "subject", "prompt", "weak_correct", "strong_correct"}


class LabelsError(ValueError):
    """The file is not RouteLLM's label layout, or a row is malformed."""


@dataclass(frozen=True)
class Row:
    prompt: str
    source: str  # mmlu | gsm8k
    subject: str
    weak: bool  # the weak model answered correctly
    strong: bool  # the strong model answered correctly

    @property
    def needs_strong(self) -> bool:
        return self.strong and not self.weak


def half_of(prompt: str) -> Half:
    digest = hashlib.sha256(f"{SPLIT_SEED}\0{prompt}".encode()).digest()
    return "fit" if digest[0] % 2 == 0 else "report"


def _flag(value: str, line: int, column: str) -> bool:
    if value not in ("True", "False"):
        raise LabelsError(f"line {line}: {column} must be True or False, got {value!r}")
    return value == "True"


def load_rows(path: Path = DATA) -> list[Row]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = _COLUMNS - set(reader.fieldnames or ())
        if missing:
            raise LabelsError(f"{path}: missing columns {sorted(missing)}")
        rows = [
            Row(
                prompt=raw["prompt"],
                source=raw["source"],
                subject=raw["subject"],
                weak=_flag(raw["weak_correct"], n, "weak_correct"),
                strong=_flag(raw["strong_correct"], n, "strong_correct"),
            )
            for n, raw in enumerate(reader, start=2)
        ]
    if not rows:
        raise LabelsError(f"{path}: no rows")
    return rows


def split(rows: list[Row], which: Half) -> list[Row]:
    return [r for r in rows if half_of(r.prompt) == which]
