"""``make reset-l2``: the stack's Redis keeps prefix-cache's warm prefixes across ``make down;
make up`` (its append-only file under the run dir), so a load test on a "fresh" stack read the
last run's prefixes as warm (81.2% saved instead of 65.9%, 0 tokens written). The command,
run while the stack is down, deletes them from those files and keeps everything else."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from services.prefix_cache.redis_store import RedisWarmStore
from services.prefix_cache.rules import Write
from services.tools.keys import ensure_keys
from services.tools.stack.ports import free_port
from services.tools.stack.processes import write_pid
from services.tools.stack.redis_process import (
    REDIS_UMASK,
    probe_redis,
    redis_argv,
    write_redis_config,
)
from tests.processes import stop_process
from tests.redis_server import client_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def stack_redis(run_dir: Path) -> Iterator[tuple[str, int]]:
    """The stack's redis-server (its own argv: append-only, fsync always, the run dir's
    password) over the run dir's data: ``redis://:password@host:port`` and its pid."""
    address = f"127.0.0.1:{free_port()}"
    password = ensure_keys(run_dir).redis_password
    argv = redis_argv(address, run_dir / "data" / "redis", write_redis_config(run_dir, password))
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, umask=REDIS_UMASK)
    try:
        deadline = time.monotonic() + 30
        while probe_redis(address, 0.5, password) != "SERVING":
            assert server.poll() is None and time.monotonic() < deadline, "no redis-server"
            time.sleep(0.05)
        yield f"redis://:{password}@{address}", server.pid
    finally:
        stop_process(server, 30)


async def _fill(server: str) -> None:
    prefix_cache = client_of(f"{server}/0")
    answers = client_of(f"{server}/2")  # the router's, same server
    try:
        writes = [Write(f"{i:064x}", 1024 * (i + 1), 300_000) for i in range(3)]
        await RedisWarmStore(prefix_cache).settle(("tenant-a", "sim-large"), [], writes, 0)
        await prefix_cache.hset("cachemesh:commit:totals:{t}", mapping={"cost_nanos": 5})
        await answers.set("answer", "kept")
    finally:
        await prefix_cache.aclose()
        await answers.aclose()


async def _read(server: str) -> tuple[int, dict[Any, Any], Any]:
    prefix_cache = client_of(f"{server}/0")
    answers = client_of(f"{server}/2")
    try:
        warm = await RedisWarmStore(prefix_cache).count()
        totals = await prefix_cache.hgetall("cachemesh:commit:totals:{t}")
        return warm, totals, await answers.get("answer")
    finally:
        await prefix_cache.aclose()
        await answers.aclose()


def _reset(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFIX_CACHE_REDIS_URL": "redis://127.0.0.1:50056/0"}
    command = [sys.executable, "-m", "services.tools.stack", "--run-dir", str(run_dir), "reset-l2"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_reset_l2_deletes_the_warm_prefixes_a_restart_keeps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with stack_redis(run_dir) as (server, _):
        asyncio.run(_fill(server))
    with stack_redis(run_dir) as (server, _):  # make down; make up: still warm
        assert asyncio.run(_read(server))[0] == 3
    reset = _reset(run_dir)
    assert reset.returncode == 0, reset.stderr
    assert "L2 is cold: 3 warm prefixes deleted" in reset.stdout
    with stack_redis(run_dir) as (server, _):
        warm, totals, answer = asyncio.run(_read(server))
    assert warm == 0
    assert totals == {b"cost_nanos": b"5"} and answer == b"kept"  # the rest is kept


def test_reset_l2_is_refused_while_the_stack_runs(tmp_path: Path) -> None:
    """Its Redis would be written by two servers; the engines' KV is warm in their processes."""
    run_dir = tmp_path / "run"
    with stack_redis(run_dir) as (server, pid):
        asyncio.run(_fill(server))
        write_pid(run_dir / "pids" / "redis.pid", pid)  # as the supervisor records it
        reset = _reset(run_dir)
        assert reset.returncode == 1
        assert "already running; stop it first" in reset.stderr
        assert asyncio.run(_read(server))[0] == 3
