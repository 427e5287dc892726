"""More routers (and HTTP fronts) beside the session's stack: real processes on free loopback
ports with settings of their own (limits, TLS), using the stack's caches and model replicas.
Each is started with the router's own environment as the stack gives it, then overridden."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.tools.stack.ports import free_port
from services.tools.stack.service_table import service
from tests.integration.harness import ROOT, RunningStack


def service_env(stack: RunningStack, name: str, extra: Mapping[str, str]) -> dict[str, str]:
    """What the stack would start ``name`` with, plus ``extra`` (no traces exported, its
    metrics on a free port and, a router, its billing outbox in memory: the stack's own
    process of that name holds the stack's port and data directory)."""
    spec = service(name)
    env = stack.stack.environment(spec, stack.stack.keys())
    env["OTEL_TRACES_EXPORTER"] = "none"
    env.pop("ROUTER_DATA_DIR", None)  # one router per data directory
    renamed = {source: target for target, source in spec.renames.items()}
    env[renamed.get(spec.metrics_var, spec.metrics_var)] = "127.0.0.1:0"
    env.update(extra)
    return env


@contextmanager
def process(
    module: str,
    env: Mapping[str, str],
    log: Path,
    ready: Callable[[], bool],
    timeout_s: float = 120.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m module`` until ``ready()``; SIGTERM (then SIGKILL) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=dict(env), stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not ready():
                if proc.poll() is not None:
                    raise RuntimeError(f"{module} exited ({proc.returncode}): {log.read_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{module} not ready in {timeout_s:.0f}s: {log.read_text()}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def loopback() -> str:
    return f"127.0.0.1:{free_port()}"


def post_message(
    url: str, key: str, text: str, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST one short sim-small question to ``url``/v1/messages (Anthropic's API): the status,
    headers and JSON body, for an error status too."""
    body = {"model": "sim-small", "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    request = urllib.request.Request(
        f"{url}/v1/messages",
        data=json.dumps(body).encode(),
        headers={
            "x-api-key": key,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())
