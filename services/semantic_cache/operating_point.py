"""The shipped operating point (threshold and verifier setting), written by calibration.

``operating_point.json`` holds what ``python -m services.tools.evaluation.semantic_cache calibrate
--write`` chose and the figures it measured; the configuration's defaults come from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OPERATING_POINT_PATH = Path(__file__).with_name("operating_point.json")


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    min_probability: float
    margin: float  # ambiguity margin: refuse when two answers are within it (0 = off)
    provenance: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {
            "threshold": self.threshold,
            "verifier_min_probability": self.min_probability,
            "ambiguity_margin": self.margin,
            "provenance": self.provenance,
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path = OPERATING_POINT_PATH) -> OperatingPoint:
        body = json.loads(path.read_text(encoding="utf-8"))
        threshold = float(body["threshold"])
        min_p = float(body["verifier_min_probability"])
        margin = float(body["ambiguity_margin"])
        if not all(0.0 <= x <= 1.0 for x in (threshold, min_p, margin)):
            raise ValueError(
                f"{path}: threshold, verifier_min_probability, ambiguity_margin"
                " must be within [0, 1]"
            )
        return cls(threshold, min_p, margin, dict(body.get("provenance", {})))
