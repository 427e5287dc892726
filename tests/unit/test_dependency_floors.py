"""The declared dependency floors are what the generated stubs need (they refuse older runtimes)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "clients" / "python" / "cachemesh" / "v1"
MANIFESTS = [ROOT / "clients" / "python" / "pyproject.toml", ROOT / "pyproject.toml"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _needed_protobuf() -> tuple[int, ...]:
    needed = set()
    for path in GENERATED.glob("*_pb2.py"):
        match = re.search(r"# Protobuf Python Version: ([\d.]+)", path.read_text())
        assert match is not None, path
        needed.add(_version(match.group(1)))
    return max(needed)


def _needed_grpcio() -> tuple[int, ...]:
    needed = set()
    for path in GENERATED.glob("*_pb2_grpc.py"):
        match = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())
        assert match is not None, path
        needed.add(_version(match.group(1)))
    return max(needed)


def _floor(manifest: Path, package: str) -> tuple[int, ...]:
    dependencies = tomllib.loads(manifest.read_text())["project"]["dependencies"]
    [spec] = [d for d in dependencies if re.match(rf"{package}\s*>=", d)]
    return _version(spec.split(">=", 1)[1].strip())


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_floors_are_what_the_generated_code_needs(manifest: Path) -> None:
    assert _floor(manifest, "protobuf") >= _needed_protobuf()
    assert _floor(manifest, "grpcio") >= _needed_grpcio()
