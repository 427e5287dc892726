"""The router's billing journal on a real stack, when its file or its disk goes.

Removed while the router runs (no root needed): prefix-cache down, two answers kept in
``billing-outbox.jsonl``, the file removed. Before the fix the router went on writing to the
unlinked file, and its next start found no bill: 2 answers served and never billed, nothing
said. Now a replay round (each ``ROUTER_OUTBOX_RETRY_S``) finds the file gone, rewrites it from
the entries the router holds, logs it at ERROR and counts it; the next start bills both.

A full disk (root only, to mount a 2 MiB tmpfs: skipped otherwise, as CI may not be root):
prefix-cache down and ROUTER_DATA_DIR full. Before the fix one ``ask()`` (the client's five
tries) paid five model calls and billed none. Now it pays one, refused (UNAVAILABLE) and held in
memory, its retries refused before the model; billed once prefix-cache and space are back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh import CachemeshError, Client
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.stack.health import SERVING, probe
from services.tools.stack.lifecycle import Stack
from tests.integration.harness import pid_of, prefix_totals, started_stack

pytestmark = pytest.mark.integration

TENANT = "tenant-a"


def _client(stack: Stack, run_dir: Path, attempts: int) -> Client:
    keys = read_env_file(run_dir / "demo-keys.env")
    return Client(
        stack.router_address, api_key=keys["CACHEMESH_KEY_A"], max_attempts=attempts, timeout_s=60
    )


def _billed(stack: Stack, run_dir: Path) -> int:
    token = (run_dir / "internal-token").read_text().strip()
    return prefix_totals(stack.addresses["prefix-cache"], token, TENANT).requests


def _ask(client: Client) -> pb.CompleteResponse:
    """A question no earlier answer serves (a namespace of its own: no semantic-cache hit)."""
    return client.ask("What is the refund policy for my order?", namespace=uuid.uuid4().hex)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _until(what: str, done: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def stack_on(tmp_path: Path) -> Iterator[tuple[Stack, Path, Path]]:
    """A stack whose router journals in a directory of the test's."""
    run_dir, data = tmp_path / "run", tmp_path / "router-data"
    extra = {"ROUTER_DATA_DIR": str(data), "OTEL_TRACES_EXPORTER": "none"}
    with started_stack(run_dir, extra) as (stack, _sink):
        yield stack, run_dir, data


def test_a_journal_removed_while_the_router_runs_loses_no_bill(
    stack_on: tuple[Stack, Path, Path],
) -> None:
    stack, run_dir, data = stack_on
    journal = data / "billing-outbox.jsonl"
    before = _billed(stack, run_dir)
    stack.stop_service("prefix-cache")
    with _client(stack, run_dir, 1) as client:
        for _ in range(2):  # served at an estimated cost, their bills journalled
            assert _ask(client).cost.estimated
    assert _lines(journal) >= 2
    journal.unlink()  # an operator's clean-up, while the router runs
    _until("the journal was not rewritten", lambda: _lines(journal) >= 2, 20)
    log = (run_dir / "logs" / "router.log").read_text()
    assert "was removed or replaced while the router runs" in log

    router = pid_of(stack, "router")
    assert router is not None
    os.kill(router, signal.SIGKILL)  # its next start bills what the file holds, no more
    _until(
        "the router did not come back",
        lambda: (
            pid_of(stack, "router") not in (None, router) and probe(stack.router_address) == SERVING
        ),
    )
    stack.start(timeout_s=240)  # prefix-cache back
    _until("the journal was not replayed", lambda: not journal.exists() or not _lines(journal))
    assert _billed(stack, run_dir) - before == 2


def _tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill needs root (CI may not be root)")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without the right): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def full_disk_stack(tmp_path: Path) -> Iterator[tuple[Stack, Path, Path]]:
    for mount in _tmpfs(tmp_path):
        data = mount / "router"
        run_dir = tmp_path / "run"
        extra = {"ROUTER_DATA_DIR": str(data), "OTEL_TRACES_EXPORTER": "none"}
        with started_stack(run_dir, extra) as (stack, _sink):
            yield stack, run_dir, mount


def test_a_full_journal_disk_with_prefix_cache_down_pays_one_model_call_and_bills_it(
    full_disk_stack: tuple[Stack, Path, Path],
) -> None:
    stack, run_dir, mount = full_disk_stack
    before = _billed(stack, run_dir)
    stack.stop_service("prefix-cache")
    filler = mount / "filler"
    with filler.open("wb") as out, pytest.raises(OSError):
        while True:  # until ENOSPC
            out.write(b"\0" * 65536)
            out.flush()
    with _client(stack, run_dir, 5) as client:
        _ask(client)  # served: its bill is held in memory, and its caller pays for it
        with pytest.raises(CachemeshError) as refused:
            _ask(client)  # the next one, and its retries, refused before the model
    assert "ROUTER_DATA_DIR" in str(refused.value)
    log = (run_dir / "logs" / "router.log").read_text()
    assert log.count("the answer to") == 1, "more than one model call was paid"
    assert "is served, its bill kept but not durably" in log

    filler.unlink()
    stack.start(timeout_s=240)  # prefix-cache back: the bill held in memory is replayed
    _until("the held bill was not billed", lambda: _billed(stack, run_dir) - before >= 1)
    time.sleep(2)  # a replay round more: nothing billed twice
    assert _billed(stack, run_dir) - before == 1
