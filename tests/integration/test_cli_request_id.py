"""``cachemesh ask`` whose call fails UNAVAILABLE on a real router (beside the session's stack,
its model replicas gone): the CLI prints the request_id the router saw, and a retry with
``--request-id`` reaches the router with that same id (the README's idempotent retry)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import loopback, process, service_env
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration

RETRY_LINE = re.compile(r"^request_id: (\w+) \(retry with --request-id (\w+)\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def router(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A router on the stack's caches whose every model replica is an address nobody serves:
    each model call fails UNAVAILABLE. Yields its log (the access lines)."""
    work = tmp_path_factory.mktemp("cli-request-id")
    dead = loopback()
    models = {
        entry.split("=", 1)[0]
        for entry in service_env(stack, "router", {})["MODEL_REPLICAS"].split(",")
    }
    address = loopback()
    env = service_env(
        stack,
        "router",
        {
            "ROUTER_LISTEN": address,
            "MODEL_REPLICAS": ",".join(f"{model}={dead}" for model in sorted(models)),
            "CACHEMESH_LOG_FORMAT": "json",
        },
    )
    log = work / "router.log"
    with process("services.router", env, log, lambda: probe(address) == SERVING):
        (work / "target").write_text(address)
        yield log


def _ask(target: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CACHEMESH_TARGET": target, "CACHEMESH_API_KEY": key}
    for name in ("CACHEMESH_TLS", "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "cachemesh.cli", "ask", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _statuses(log: Path, request_id: str, count: int) -> list[str]:
    """The statuses of the router's access lines for ``request_id``, once it has written
    ``count`` of them (a line is written after the call's bills settle)."""
    deadline = time.monotonic() + 20
    while True:
        statuses = []
        for line in log.read_text().splitlines():
            if '"access"' in line and request_id in line:
                fields = json.loads(line)
                if fields.get("request_id") == request_id:
                    statuses.append(str(fields["status"]))
        if len(statuses) >= count or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def test_a_failed_ask_names_the_id_the_router_saw_and_the_retry_sends_it(
    stack: RunningStack, router: Path
) -> None:
    target = (router.parent / "target").read_text()
    question = f"Where is my order? ({uuid.uuid4().hex[:8]})"
    first = _ask(target, stack.keys["tenant-a"], question, "--model", "sim-small")
    assert first.returncode == 1, first.stderr
    found = RETRY_LINE.search(first.stderr)
    assert found is not None, first.stderr
    request_id, again = found.groups()
    assert request_id == again
    sent = _statuses(router, request_id, 1)  # gRPC's own retries resend the id: one a try
    assert sent and set(sent) == {"UNAVAILABLE"}, router.read_text()[-2000:]

    retry = _ask(
        target, stack.keys["tenant-a"], question, "--model", "sim-small", "--request-id", request_id
    )
    assert retry.returncode == 1, retry.stderr
    assert f"request_id: {request_id} (retry with --request-id {request_id})" in retry.stderr
    resent = _statuses(router, request_id, len(sent) + 1)
    assert len(resent) > len(sent) and set(resent) == {"UNAVAILABLE"}
