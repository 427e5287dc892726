"""A provider replica imports its own backend's SDK only: the other's import cost every replica
of the other backend CPU at start (anthropic's about 1.8 s, openai's 0.5 s) and memory for
good. Each case is a fresh interpreter that builds the replica's API as ``serve()`` does (the
model service's modules imported, then ``build_provider_api``) and says which SDKs it holds;
and a failure of the SDK it holds is still classified as that SDK's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_BUILD = """
import asyncio, json, sys
import httpx2
import services.model.app
from services.common.tokens import load_cl100k
from services.model.providers.failures import Kind, classify
from services.model.providers.wiring import build_provider_api
from services.model.settings import ModelSettings

backend = sys.argv[1]
env = {"MODEL_BACKEND": backend, "MODEL_IDS": sys.argv[2]}
env["CACHEMESH_INTERNAL_TOKEN"] = "internal-token-for-the-test"
env[backend.upper() + "_API_KEY"] = "sk-test-key"
env[backend.upper() + "_BASE_URL"] = "http://127.0.0.1:9" + ("/v1" if backend == "openai" else "")
settings = ModelSettings.from_env(env)

async def health(serving: bool) -> None:
    return None

api = build_provider_api(settings, load_cl100k(), health)
sdk = sys.modules[backend]
request = httpx2.Request("POST", "http://127.0.0.1:9/v1/x")
refusal = sdk.APIStatusError(
    "overloaded", response=httpx2.Response(529, request=request), body=None
)
lost = sdk.APIConnectionError(request=request)
import logging
print(json.dumps({
    "sdks": sorted(m for m in ("anthropic", "openai") if m in sys.modules),
    "levels": {
        name: logging.getLogger(name).getEffectiveLevel()
        for name in (backend, "httpx", "httpx2")
    },
    "refusal": [classify(refusal).kind.value, classify(refusal).status],
    "lost": classify(lost).kind.value,
}))
"""


@pytest.mark.parametrize(
    ("backend", "model"), [("openai", "local-small"), ("anthropic", "claude-haiku-4-5")]
)
def test_a_replica_holds_its_own_backends_sdk_only(backend: str, model: str) -> None:
    """With the SDK's own debug logging asked for (``ANTHROPIC_LOG`` / ``OPENAI_LOG``), its
    loggers are still quieted: the SDK's import, now in ``build_adapter``, set them to DEBUG
    after the quieting had run, and a request's options (its prompt) reached the log."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients/python")]),
        "ANTHROPIC_LOG": "debug",
        "OPENAI_LOG": "debug",
    }
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, backend, model],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["sdks"] == [backend]
    assert seen["levels"] == {backend: 20, "httpx": 30, "httpx2": 30}  # INFO, WARNING
    assert seen["refusal"] == ["retry", 529]
    assert seen["lost"] == "retry"
