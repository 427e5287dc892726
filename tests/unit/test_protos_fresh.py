"""The generated stubs are never edited by hand: regenerating them changes nothing."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "clients" / "python" / "cachemesh" / "v1"


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "--no-print-directory", "proto", f"PROTO_OUT={tmp_path}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "cachemesh" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed = sorted(
        p.name for p in GENERATED.iterdir() if p.is_file() and p.name != "__init__.py"
    )
    assert names == committed, "run `make proto`: the set of generated files changed"
    stale = [n for n in names if not filecmp.cmp(fresh / n, GENERATED / n, shallow=False)]
    assert not stale, f"run `make proto` and commit: stale generated files {stale}"
