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
    with processes([(module, env, log, ready)], timeout_s) as (proc,):
        yield proc


Started = tuple[str, Mapping[str, str], Path, Callable[[], bool]]  # module, env, log, ready


@contextmanager
def processes(
    specs: list[Started], timeout_s: float = 120.0
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Each ``python -m module`` of ``specs`` started at once, then each until its ``ready()``
    (they load their models side by side, not one after the other); SIGTERM (then SIGKILL)
    to all on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for module, env, log, _ in specs:
            with log.open("wb") as out:  # the child holds its own descriptor
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module],
                        cwd=ROOT,
                        env=dict(env),
                        stdout=out,
                        stderr=out,
                    )
                )
        deadline = time.monotonic() + timeout_s
        for proc, (module, _, log, ready) in zip(procs, specs, strict=True):
            while not ready():
                if proc.poll() is not None:
                    raise RuntimeError(f"{module} exited ({proc.returncode}): {log.read_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{module} not ready in {timeout_s:.0f}s: {log.read_text()}")
                time.sleep(0.1)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
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
