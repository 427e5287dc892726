"""Prints the runtime requirements of the services and the client package, one a line.

The Dockerfiles install them (with ``-c constraints.txt``) in a layer of their own, before the
code is copied in, so a code change does not reinstall the dependencies. Standard library
only: it runs in the image before anything is installed (``python services/tools/requirements.py``
from the repository root).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECTS = (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml")
OWN = ("cachemesh-client", "cachemesh-services")  # this repository's packages: its code


def requirements() -> list[str]:
    found: list[str] = []
    for path in PYPROJECTS:
        with path.open("rb") as handle:
            declared = tomllib.load(handle)["project"]["dependencies"]
        found += [d for d in declared if not d.startswith(OWN) and d not in found]
    return found


def main() -> int:
    sys.stdout.write("".join(f"{line}\n" for line in requirements()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
