"""Every service's Dockerfile installs the pinned dependencies before it copies the code (a code
change keeps the dependency layer cached) and runs the service as a user that is not root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.tools.requirements import requirements

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile"))
# what the dependency layer may copy: the pins and the declared dependencies, nothing of the code
METADATA = {
    "constraints.txt",
    "pyproject.toml",
    "clients/python/pyproject.toml",
    "services/tools/requirements.py",
}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_there_are_five() -> None:
    assert len(DOCKERFILES) == 5


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dependencies_are_a_layer_before_the_code(path: Path) -> None:
    steps = _instructions(path)
    install = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "pip install" in arg)
    copied_before = [arg.split()[:-1] for op, arg in steps[:install] if op == "COPY"]
    assert copied_before and all(set(sources) <= METADATA for sources in copied_before), (
        copied_before
    )
    code = [i for i, (op, arg) in enumerate(steps) if op == "COPY" and "services" in arg.split()]
    assert code and min(code) > install
    assert "-c constraints.txt" in steps[install][1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_service_runs_as_a_user_that_is_not_root(path: Path) -> None:
    steps = _instructions(path)
    users = [(i, arg) for i, (op, arg) in enumerate(steps) if op == "USER"]
    cmd = next(i for i, (op, _) in enumerate(steps) if op == "CMD")
    assert users and users[-1][0] < cmd
    assert users[-1][1] not in ("root", "0", "0:0")


def test_the_dependency_list_is_what_the_packages_declare_and_every_one_is_pinned() -> None:
    listed = requirements()
    assert "grpcio>=1.85.1" in listed and "aiohttp>=3.14" in listed
    assert not [r for r in listed if r.startswith("cachemesh")]  # the code is copied, not installed
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
    }
    names = {re.split(r"[<>=!~ \[]", r)[0].lower().replace("_", "-") for r in listed}
    assert names <= pinned, names - pinned
