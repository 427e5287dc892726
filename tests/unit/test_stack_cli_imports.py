"""The stack CLI (``python -m services.tools.stack``: every make up, down, status, demo, and the
supervisor ``up`` starts) imports only what its commands share: grpc (its health probe), redis-py
(``reset-l2``) and pydantic (the model table, for ``up --local-engine``) are imported by the
commands that use them. Imported at the top, they cost each run ~0.45 s of its ~0.6 s here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("grpc", "grpc_health", "redis", "pydantic", "numpy", "google.protobuf")


def _imported_after(statement: str) -> list[str]:
    code = (
        f"import json, sys; {statement}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    roots = set(json.loads(done.stdout))
    return [name for name in HEAVY if name.split(".")[0] in roots]


def test_the_stack_cli_imports_no_grpc_redis_or_pydantic() -> None:
    assert _imported_after("import services.tools.stack.cli") == []


def test_each_heavy_import_comes_with_the_command_that_uses_it() -> None:
    # the lazy imports resolve: the probe's grpc stubs, reset-l2's redis, the engine's table
    assert "grpc" in _imported_after(
        "from services.tools.stack.health import probe; probe('127.0.0.1:1', 0.05)"
    )
    assert "redis" in _imported_after("import services.tools.stack.reset_l2")
    settings = _imported_after(
        "from services.tools.engine.servers import EngineOptions, Replica, local_engine_settings; "
        "local_engine_settings({}, [Replica(0, 1, 1)], EngineOptions())"
    )
    assert "pydantic" in settings
