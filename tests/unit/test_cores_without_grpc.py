"""Each service's core imports without gRPC: the transport lives in the servicers only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORES = [
    "cachemesh.v1.gateway_pb2",  # the generated messages, without the package's client
    "cachemesh.v1.prefix_cache_pb2",
    "cachemesh.v1.semantic_cache_pb2",
    "cachemesh.v1.model_pb2",
    "services.common.errors",
    "services.common.prompt",
    "services.prefix_cache.core",
    "services.semantic_cache.cache",
    "services.model.engine",
    "services.router.validation",
    "services.router.tiering",
]
PROBE = (
    "import importlib, sys; importlib.import_module(sys.argv[1]); "
    "print(','.join(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))))"
)


@pytest.mark.parametrize("module", CORES)
def test_the_core_imports_without_grpc(module: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == "", f"{module} pulls in {run.stdout.strip()}"


def test_the_probe_sees_grpc_when_it_is_imported() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, "services.common.status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "grpc" in run.stdout.split(",")
