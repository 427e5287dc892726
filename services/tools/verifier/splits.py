"""The one split of every labelled file: fit and report halves, and the fit half's two slices.

The halves are the harness's (``datasets.half_of``: sha256 of the first question). Within the
fit half the cross-encoder trains on the *train* slice only; the *tune* slice (a quarter, by
the second byte of the same digest) is kept for what is fitted on the cross-encoder's scores:
the small logistic that combines them with the cosine, and the calibration of the operating
point. Scores of pairs the network was trained on are over-confident; fitting on them would
ship a point that serves too much. The report half is never used to fit or tune anything.

Standard library only (imported by the trainer in ``.venv-train`` and by the harness).
"""

from __future__ import annotations

import hashlib
from typing import Literal

Slice = Literal["train", "tune", "report"]
TUNE_EVERY = 4  # one fit-half pair in 4 goes to the tune slice


def slice_of(first: str) -> Slice:
    digest = hashlib.sha256(first.encode("utf-8")).digest()
    if digest[0] % 2 == 1:
        return "report"
    return "tune" if digest[1] % TUNE_EVERY == 0 else "train"
