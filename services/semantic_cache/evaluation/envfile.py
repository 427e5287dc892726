"""Writes the calibrated operating point into the stack's settings file (``.env``)."""

from __future__ import annotations

import re
from pathlib import Path

from services.semantic_cache.operating_point import OperatingPoint

THRESHOLD_KEY = "SEMANTIC_CACHE_THRESHOLD"
VERIFIER_KEY = "SEMANTIC_CACHE_VERIFIER_MIN_P"
MARGIN_KEY = "SEMANTIC_CACHE_AMBIGUITY_MARGIN"


def write_env(path: Path, point: OperatingPoint) -> None:
    """Replaces the keys' lines; a missing one goes after the line before it (or at the end).

    Every other line is kept as it is.
    """
    text = path.read_text(encoding="utf-8")
    previous = ""
    settings = (
        (THRESHOLD_KEY, point.threshold),
        (VERIFIER_KEY, point.min_probability),
        (MARGIN_KEY, point.margin),
    )
    for key, value in settings:
        line = f"{key}={value}"
        pattern = re.compile(rf"^{key}=.*$", re.MULTILINE)
        after = re.compile(rf"^{previous}=.*$", re.MULTILINE).search(text) if previous else None
        if pattern.search(text):
            text = pattern.sub(line, text)
        elif after is not None:
            text = f"{text[: after.end()]}\n{line}{text[after.end() :]}"
        else:
            text = text.rstrip("\n") + f"\n{line}\n"
        previous = key
    path.write_text(text, encoding="utf-8")
