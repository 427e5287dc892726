"""The public data sets some tests replay (``../shared/data``, or ``CACHEMESH_DATA_DIR``).

A clone stands alone: without the data, the tests that need it are skipped with the reason,
and every other test runs on fixtures the project writes itself. Where ``CI`` is set the data
must be there (CI has it), so a missing directory fails those tests instead of hiding them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The data directory, or a skip (a failure under CI) saying where it was looked for."""
    configured = os.environ.get("CACHEMESH_DATA_DIR")
    path = Path(configured) if configured else ROOT.parent / "shared" / "data"
    if path.is_dir():
        return path
    reason = (
        f"needs the public data sets at {path} (../shared/data beside the clone, or "
        "CACHEMESH_DATA_DIR)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, and CI must have them")
    pytest.skip(reason)
