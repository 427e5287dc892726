"""The files holding tenants' data are the service user's alone under the usual umask (022):
semantic-cache's write-ahead log (every tenant's prompts and answers in clear), its snapshot,
lock and tenant policies, the router's billing journal: files 0600, the directories the code
creates 0700. Wider ones left by an older version are tightened at start-up, in one line, and
a path that cannot be tightened is said, never a failed start."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common import private_files
from services.router.outbox_journal import Journal
from services.semantic_cache.tenant_policy import FILE_NAME, PolicyChange, TenantPolicies
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.test_semantic_cache_persistence_app import environ, run_once
from tests.unit.test_semantic_cache_wal import _two_records


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (``root`` itself as "."), with its permissions in octal."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def _wider(root: Path) -> dict[str, str]:
    return {path: mode for path, mode in _modes(root).items() if int(mode, 8) & 0o077}


def _loosen(root: Path) -> None:
    """Modes an older version left: directories 0755, files 0644."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


async def test_semantic_cache_writes_its_data_for_its_user_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "semantic-cache"  # created by the service
    assert (await run_once(environ(data_dir), store=True)).hit
    policies = TenantPolicies(data_dir / FILE_NAME)
    await policies.set("t1", PolicyChange(l1_enabled=False))
    names = set(_modes(data_dir))
    assert {".", ".lock", "semantic-cache.snapshot", "wal", FILE_NAME} <= names, names
    assert any(name.startswith("wal/") and name.endswith(".log") for name in names), names
    assert _wider(data_dir) == {}


async def test_wider_modes_left_before_are_tightened_at_start_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "semantic-cache"
    await run_once(environ(data_dir), store=True)
    _loosen(data_dir)
    loose = len(_wider(data_dir))
    with caplog.at_level(logging.WARNING):
        assert (await run_once(environ(data_dir), store=False)).hit  # the start goes on
    assert _wider(data_dir) == {}
    said = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"SEMANTIC_CACHE_DATA_DIR: {loose} files or directories"), said


async def test_a_damaged_record_moved_aside_is_private(tmp_path: Path) -> None:
    segment = await _two_records(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0x04  # the last record whole, its body damaged
    segment.write_bytes(bytes(data))
    segment.chmod(0o600)
    WriteAheadLog(tmp_path).open()
    assert (tmp_path / f"{segment.name}.damaged").is_file()
    assert _wider(tmp_path) == {}


def test_the_routers_journal_directory_is_private_and_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "router"
    journal = Journal(data_dir)
    journal.load()
    commit = pc.CommitRequest(tenant="t", request_id="r#1", phase=pc.COMMIT_PHASE_FINAL)
    journal.add("e1", [commit])
    journal.sync()
    journal.close()
    assert _wider(data_dir) == {}, _modes(data_dir)
    _loosen(data_dir)
    with caplog.at_level(logging.WARNING):
        Journal(data_dir).close()
    assert _wider(data_dir) == {}
    (said,) = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert said.startswith("ROUTER_DATA_DIR: 3 files or directories"), said


def test_a_shared_directory_and_a_path_that_cannot_change_are_said_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shared, theirs, link = tmp_path / "shared", tmp_path / "theirs", tmp_path / "link"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)  # (the umask took some off)
    theirs.write_text("x")
    theirs.chmod(0o644)
    link.symlink_to(theirs)
    real_chmod = os.chmod

    def chmod(path: Path, mode: int) -> None:
        if Path(path) == theirs:
            raise PermissionError(1, "Operation not permitted")
        real_chmod(path, mode)

    monkeypatch.setattr(os, "chmod", chmod)
    log = logging.getLogger("test.private")
    with caplog.at_level(logging.WARNING, logger="test.private"):
        tightened = private_files.tighten([shared, theirs, link, tmp_path / "gone"], "X", log)
    assert tightened == []
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("X: 2 files or directories") and "could not be made private" in said
    assert f"{shared} (a shared directory" in said and f"{theirs} (Operation not permitted)" in said
