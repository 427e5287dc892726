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
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from unittest import mock

import pytest

from services.tools.stack.ports import (
    PORT_RANGE_VAR,
    claim_port_block,
    ephemeral_low,
    port_blocks_dir,
)

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
    # each run with a TMPDIR of its own: the ports are the machine's whatever TMPDIR says (the
    # lock files followed $TMPDIR, and two such runs both claimed 10000-11499)
    env = {k: v for k, v in os.environ.items() if k != PORT_RANGE_VAR}
    env |= {"PYTEST_XDIST_WORKER": "gw0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
    runs = []
    try:
        for run_number in range(2):
            tmpdir = tmp_path / f"run{run_number}"
            tmpdir.mkdir()
            runs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER], cwd=ROOT, env=env | {"TMPDIR": str(tmpdir)},
                    text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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


# Another user's lock folder, as an earlier run leaves it (root's: folder 0755, files 0644): the
# claim opened each file for appending, and every other user's ``pytest_configure`` failed
# PermissionError (no test ran). As root (whom no mode stops) the claim runs in a child that
# is the user nobody; as another user the folder and files are made read-only (0555, 0444).
_NOBODY = 65_534


def _claim_as_another_user(lock_dir: Path, below: int) -> str:
    """The span ``_claim(0, ...)`` gives a user who does not own ``lock_dir``, or the text of
    what it raised."""
    if os.geteuid() != 0:
        for lock_file in lock_dir.iterdir():
            lock_file.chmod(0o444)
        lock_dir.chmod(0o555)
        try:  # and its owner another (whose folder is not this user's to chmod)
            with mock.patch("os.geteuid", return_value=os.getuid() + 1):
                span, held = _claim(0, lock_dir, below)
            held.close()
            return span
        except Exception as error:  # its text is the answer
            return f"{type(error).__name__}: {error}"
        finally:
            lock_dir.chmod(0o755)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: nobody, and it never returns into pytest
        answer = "no answer"
        try:
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            span, held = _claim(0, lock_dir, below)
            held.close()
            answer = span
        except BaseException as error:  # its text is the answer
            answer = f"{type(error).__name__}: {error}"
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer_pipe:
        answer = answer_pipe.read().decode()
    os.waitpid(child, 0)
    return answer


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A folder every user reaches (pytest's own tmp_path is its user's alone: 0700)."""
    with tempfile.TemporaryDirectory(prefix="cachemesh-blocks-test-", dir="/tmp") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def _anothers_folder(parent: Path, spans: list[str]) -> Path:
    lock_dir = parent / "blocks"
    lock_dir.mkdir()
    for span in spans:
        (lock_dir / f"{span}.lock").touch(mode=0o644)
    lock_dir.chmod(0o755)
    return lock_dir


def test_another_users_lock_files_still_lock(reachable: Path) -> None:
    lock_dir = _anothers_folder(reachable, ["20000-20099", "20100-20199"])
    assert _claim_as_another_user(lock_dir, 20_200) == "20000-20099"


def test_a_lock_file_another_users_folder_cannot_hold_is_skipped(reachable: Path) -> None:
    lock_dir = _anothers_folder(reachable, ["20100-20199"])  # no file for 20000-20099
    assert _claim_as_another_user(lock_dir, 20_300) == "20100-20199"
    (reachable / "b").mkdir(mode=0o755)
    refused = _claim_as_another_user(_anothers_folder(reachable / "b", []), 20_300)
    assert "3 of them a lock file this user may not create or open" in refused, refused


def test_the_folder_is_made_writable_by_every_user(tmp_path: Path) -> None:
    lock_dir = tmp_path / "blocks"
    span, held = _claim(0, lock_dir, 20_100)
    held.close()
    assert span == "20000-20099"
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777  # sticky: a user's files are its own
    assert port_blocks_dir() == Path("/tmp/cachemesh-port-blocks")  # one for the machine
