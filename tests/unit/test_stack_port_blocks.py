"""Each test process's block of free ports, claimed machine wide (services.tools.stack.ports,
tests/conftest.py).

Two test runs on one machine (two checkouts' ``make test``, CI's beside a developer's) gave
both their worker gw0 the same range (20000-22999): a port one run chose free, released until
its service bound it, could be taken by the other run's, and a stack's start then failed
"Address already in use". A block is held by a lock on a file of its own while its process
lives: no two live processes get the same ports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO

import pytest

from services.tools.stack.ports import PORT_RANGE_VAR, claim_port_block, ephemeral_low

ROOT = Path(__file__).resolve().parents[2]

# a test process as xdist's worker gw0 configures itself (tests/conftest.py), the range it
# is given printed; it lives (holding what it claimed) until its standard input closes
_WORKER = textwrap.dedent(
    """
    import os, sys, types
    import tests.conftest as conftest
    config = types.SimpleNamespace(
        workerinput={"workerid": "gw0"}, option=types.SimpleNamespace(numprocesses=None),
        stash={},
    )
    conftest.pytest_configure(config)
    print(os.environ["CACHEMESH_FREE_PORT_RANGE"], flush=True)
    sys.stdin.read()
    """
)


def test_two_test_runs_workers_gw0_get_different_ranges(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != PORT_RANGE_VAR}
    env |= {"PYTEST_XDIST_WORKER": "gw0", "TMPDIR": str(tmp_path)}  # the lock files here
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
    runs = []
    try:
        for _ in range(2):
            runs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER], cwd=ROOT, env=env, text=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )
            )  # fmt: skip
        first, second = (run.stdout.readline().strip() for run in runs if run.stdout)
    finally:
        for run in runs:
            if run.stdin:
                run.stdin.close()
            run.wait(timeout=30)
    assert first and second
    low = [int(span.partition("-")[0]) for span in (first, second)]
    high = [int(span.partition("-")[2]) for span in (first, second)]
    assert high[0] < low[1] or high[1] < low[0], (first, second)  # no port in both
    assert max(high) < ephemeral_low()  # none the kernel hands out itself


def _claim(preferred: int, lock_dir: Path, below: int) -> tuple[str, IO[bytes]]:
    return claim_port_block(preferred, lock_dir=lock_dir, first=20_000, size=100, below=below)


def test_a_block_is_held_until_its_holder_lets_it_go(tmp_path: Path) -> None:
    span, held = _claim(0, tmp_path, 20_300)
    assert span == "20000-20099"
    other, other_held = _claim(0, tmp_path, 20_300)
    assert other == "20100-20199"  # the preferred one is another's: the next
    held.close()  # its process ended
    again, again_held = _claim(0, tmp_path, 20_300)
    assert again == "20000-20099"
    other_held.close()
    again_held.close()


def test_a_worker_starts_at_its_own_block_and_wraps_around(tmp_path: Path) -> None:
    span, held = _claim(2, tmp_path, 20_300)
    assert span == "20200-20299"
    wrapped, wrapped_held = _claim(5, tmp_path, 20_300)
    assert wrapped == "20000-20099"  # 5 % 3 blocks = 2, held: from the first on
    held.close()
    wrapped_held.close()


def test_every_block_held_is_refused_naming_the_variable(tmp_path: Path) -> None:
    held = [_claim(0, tmp_path, 20_250)[1] for _ in range(2)]
    with pytest.raises(RuntimeError, match=f"every one of the 2 blocks.*{PORT_RANGE_VAR}"):
        _claim(0, tmp_path, 20_250)
    for handle in held:
        handle.close()


def test_no_room_below_the_ephemeral_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=f"no block of 1,500 ports.*{PORT_RANGE_VAR}"):
        claim_port_block(0, lock_dir=tmp_path, first=10_000, size=1_500, below=11_000)
