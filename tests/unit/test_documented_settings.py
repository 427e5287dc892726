"""Every variable a tool or client reads straight from the environment (not through a service's
validated settings, which the service READMEs' tables list) is named in a README: a setting
found only in ``--help`` or the source is one an operator cannot find."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_READ = re.compile(r"""os\.environ(?:\.get)?[\[(]\s*["']([A-Z][A-Z0-9_]*)["']""")
_STANDARD = {"PATH", "HOME", "XDG_CACHE_HOME"}  # the platform's, documented elsewhere


def _sources() -> list[Path]:
    return [*(ROOT / "services").rglob("*.py"), *(ROOT / "clients" / "python").rglob("*.py")]


def _readmes() -> str:
    found = [ROOT / "README.md", *(ROOT / "services").rglob("README.md")]
    return "\n".join(path.read_text() for path in found)


def test_every_variable_read_from_the_environment_is_in_a_readme() -> None:
    read = {name for path in _sources() for name in _READ.findall(path.read_text())}
    assert "CACHEMESH_TARGET" in read  # the pattern still finds the reads
    documented = _readmes()
    missing = sorted(
        name
        for name in read - _STANDARD
        if not name.startswith("OTEL_") and f"`{name}`" not in documented
    )
    assert missing == []
