"""Writes the calibrated operating point into the stack's settings file (``.env``)."""

from __future__ import annotations

from pathlib import Path

from cachemesh.envfile import set_values
from services.semantic_cache.operating_point import OperatingPoint

THRESHOLD_KEY = "SEMANTIC_CACHE_THRESHOLD"
VERIFIER_KEY = "SEMANTIC_CACHE_VERIFIER_MIN_P"
MARGIN_KEY = "SEMANTIC_CACHE_AMBIGUITY_MARGIN"


def write_env(path: Path, point: OperatingPoint) -> None:
    """Replaces the keys' lines; a missing one goes after the line before it (or at the end).

    Every other line is kept as it is.
    """
    values = (
        (THRESHOLD_KEY, str(point.threshold)),
        (VERIFIER_KEY, str(point.min_probability)),
        (MARGIN_KEY, str(point.margin)),
    )
    path.write_text(set_values(path.read_text(encoding="utf-8"), values), encoding="utf-8")
