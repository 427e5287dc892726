"""The stack's own Redis holds every tenant's recorded answers, commit records and totals: it
required no password (loopback and protected mode only), so any local user could read every
tenant's answers and rewrite bills (one HINCRBY made tenant-a's cost $5.0008 instead of
$0.0008), and its files were 0644. Now it requires the run dir's generated password, which the
services get in their Redis URLs and nothing shows (its command line, the logs)."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from cachemesh import Client
from services.prefix_cache.redis_store import WARM_PREFIX
from tests.integration.harness import RunningStack
from tests.redis_server import sync_client_of

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_stacks_redis_refuses_a_client_without_its_password(
    stack: RunningStack, client_a: Client
) -> None:
    client_a.ask("Is the stack's Redis locked?")  # the services write there: they have it
    assert stack.totals("tenant-a").requests >= 1
    host, _, port = stack.addresses["redis"].rpartition(":")
    # what redis-cli -p PORT sends (an inline command), as any local user could
    with socket.create_connection((host, int(port)), timeout=5) as anonymous:
        anonymous.sendall(b"HINCRBY cachemesh:commit:totals:{tenant-a} cost_nanos 5000000000\r\n")
        assert anonymous.recv(256).startswith(b"-NOAUTH Authentication required")
    run_dir = stack.stack.run_dir
    password = (run_dir / "redis-password").read_text().strip()
    assert len(password) >= 32
    with sync_client_of(f"redis://{host}:{port}/0", password=password) as admin:
        assert admin.keys(f"{WARM_PREFIX}:*") or admin.keys("cachemesh:commit:*")


def test_the_password_is_in_no_command_line_nor_log_and_the_files_are_private(
    stack: RunningStack,
) -> None:
    run_dir = stack.stack.run_dir
    password = (run_dir / "redis-password").read_text().strip()
    # 0644 for compose's mount into the containers' non-root user; the 0700 run dir keeps it
    # from this host's other users (services/tools/keys.py)
    assert _mode(run_dir / "redis-password") == 0o644 and _mode(run_dir) == 0o700
    pids = {r.service.name: r.pid for r in stack.stack.running()}
    assert password not in Path(f"/proc/{pids['redis']}/cmdline").read_text()
    for log in (run_dir / "logs").iterdir():
        assert password not in log.read_text(errors="replace"), log.name
    data = run_dir / "data" / "redis"
    assert _mode(data) == 0o700
    inside = list(data.rglob("*"))
    assert inside, "no append-only file written"
    for path in inside:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
