"""After ``make down`` the run dir's ``demo-keys.env`` names no stack. ``make up FREE_PORTS=1``
writes where its stack listens there (CACHEMESH_TARGET, CACHEMESH_HTTP_URL); ``down`` forgot the
ports (``ports.env``) but left those lines, so a shell that sourced the file afterwards dialled a
free port that nothing of this stack held any more (another program may take it). The keys stay;
the next ``up`` writes where it listens again."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.tools.keys import ENDPOINT_VARS, ensure_keys
from services.tools.stack import cli
from services.tools.stack.ports import MOVED_FILE, write_moved

WHERE = {"CACHEMESH_TARGET": "127.0.0.1:51201", "CACHEMESH_HTTP_URL": "http://127.0.0.1:51219"}


def _down(root: Path) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--root", str(root), "--run-dir", str(root / ".run"), "down"])
    return int(exit_.value.code or 0)


def test_down_drops_where_the_stack_listened_and_keeps_the_keys(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=1\n")
    run_dir = tmp_path / ".run"
    keys = ensure_keys(run_dir, WHERE)  # what up --free-ports wrote
    write_moved(run_dir, {"ROUTER_LISTEN": WHERE["CACHEMESH_TARGET"]})
    before = read_env_file(keys.demo_keys_file)
    assert {k: before[k] for k in WHERE} == WHERE
    assert _down(tmp_path) == 0
    after = read_env_file(keys.demo_keys_file)
    names = set(after)  # the names only, in a failure's report: the values are keys
    assert not (run_dir / MOVED_FILE).exists()
    assert not set(ENDPOINT_VARS) & names
    assert after == {k: v for k, v in before.items() if k not in ENDPOINT_VARS}
    assert after["CACHEMESH_KEY_A"] == keys.key_for("tenant-a")
    assert (keys.demo_keys_file.stat().st_mode & 0o777) == 0o600
    ensure_keys(run_dir)  # make keys after down: still no stack named
    assert not set(ENDPOINT_VARS) & set(read_env_file(keys.demo_keys_file))


def test_down_without_demo_keys_creates_none(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=1\n")
    assert _down(tmp_path) == 0
    assert not (tmp_path / ".run" / "demo-keys.env").exists()


def test_down_keeps_a_users_own_lines_as_written(tmp_path: Path) -> None:
    """A line the env-file reader refuses (a ``$``) stopped ``down`` with rc 1 before it
    stopped the stack's llama-server replicas; the file is edited line by line now."""
    (tmp_path / ".env").write_text("A=1\n")
    run_dir = tmp_path / ".run"
    keys = ensure_keys(run_dir, WHERE)
    own = '# mine\nexport PATH="$PATH:/opt/x"\n'
    with keys.demo_keys_file.open("a", encoding="utf-8") as demo:
        demo.write(own)
    assert _down(tmp_path) == 0
    text = keys.demo_keys_file.read_text(encoding="utf-8")
    assert text.endswith(own)
    assert not any(f"{name}=" in text for name in ENDPOINT_VARS)
    assert f"CACHEMESH_KEY_A={keys.key_for('tenant-a')}" in text
