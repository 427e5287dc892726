"""``python -m services.tools.engine build|paths``: the llama-server engine's one-time build.

Where it goes (``CACHEMESH_CACHE_DIR``) is read as the stack reads it for ``up --local-engine``:
the repository's ``.env``, the environment over it (``--root`` names another repository).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cachemesh._argv import Parser
from cachemesh.envfile import EnvFileError
from services.tools.engine.build import BuildError, ensure_engine
from services.tools.engine.cache import engine_paths
from services.tools.stack.environment import tool_settings

_REPO_ROOT = Path(__file__).resolve().parents[3]


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m services.tools.engine", description=__doc__)
    parser.add_argument("--root", type=Path, default=_REPO_ROOT, help="repository root (.env)")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build llama-server and unpack the model if missing")
    build.add_argument("--log", type=Path, default=None, help="append cmake/ninja output here")
    commands.add_parser("paths", help="print the cached server and model paths (JSON)")
    args = parser.parse_args(argv)
    try:
        settings = tool_settings(args.root, os.environ)
    except EnvFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    paths = engine_paths(settings)
    if args.command == "paths":
        print(json.dumps({"server": str(paths.server), "model": str(paths.model),
                          "ready": paths.ready()}))  # fmt: skip
        return
    try:
        record = ensure_engine(paths, args.log)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(
        f"llama-server {record['package']} at {paths.server} "
        f"(built in {record['build_seconds']} s at {record['built_at']}); model {paths.model}"
    )
