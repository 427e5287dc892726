"""services.tools.keys: this install's secrets, generated once, hashed, private."""

from __future__ import annotations

import os
import stat
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachemesh.envfile import EnvFileError, read_env_file
from services.common.key_store import KeyStore
from services.common.keyfile import KeyFile, hash_key
from services.tools import keys as keys_module
from services.tools.keys import announce, describe, ensure_keys, forget_endpoints, main

ROOT = Path(__file__).resolve().parents[2]


def _store(path: Path) -> KeyStore:
    return KeyStore.open(path, time.monotonic, time.time, 0.0)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generates_two_tenants_keys_in_the_documented_files(tmp_path: Path) -> None:
    run = tmp_path / ".run"
    keys = ensure_keys(run)
    assert keys.created
    demo = read_env_file(run / "demo-keys.env")
    assert set(demo) == {"CACHEMESH_KEY_A", "CACHEMESH_KEY_B", "CACHEMESH_ADMIN_TOKEN_FILE"}
    assert demo.pop("CACHEMESH_ADMIN_TOKEN_FILE") == str(run.resolve() / "admin-token")
    assert demo["CACHEMESH_KEY_A"] == keys.key_for("tenant-a")
    assert demo["CACHEMESH_KEY_B"] == keys.key_for("tenant-b")
    assert demo["CACHEMESH_KEY_A"] != demo["CACHEMESH_KEY_B"]
    assert all(key.startswith("cm_") and len(key) > 40 for key in demo.values())


def test_demo_keys_file_exports_the_keys_to_a_sourcing_shell(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    script = f"source {keys.demo_keys_file}; env"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert exported["CACHEMESH_KEY_A"] == keys.key_for("tenant-a")
    assert exported["CACHEMESH_KEY_B"] == keys.key_for("tenant-b")
    assert exported["CACHEMESH_ADMIN_TOKEN_FILE"] == str(keys.admin_token_file)


def test_the_demo_keys_name_where_the_stack_listens_and_make_keys_keeps_it(
    tmp_path: Path,
) -> None:
    # `make up` on other ports: a shell that sourced demo-keys.env sent the keys (and the
    # admin token) to 127.0.0.1:50051, another stack or program.
    where = {"CACHEMESH_TARGET": "127.0.0.1:51201", "CACHEMESH_HTTP_URL": "http://127.0.0.1:51219"}
    keys = ensure_keys(tmp_path, where)
    assert {k: v for k, v in read_env_file(keys.demo_keys_file).items() if k in where} == where
    ensure_keys(tmp_path)  # make keys: no stack to ask, the file keeps what up wrote
    assert {k: v for k, v in read_env_file(keys.demo_keys_file).items() if k in where} == where
    moved = {**where, "CACHEMESH_TARGET": "127.0.0.1:50051"}
    ensure_keys(tmp_path, moved)  # the next up, elsewhere
    assert read_env_file(keys.demo_keys_file)["CACHEMESH_TARGET"] == "127.0.0.1:50051"


def test_up_and_down_keep_the_users_own_lines_in_the_demo_keys_file(tmp_path: Path) -> None:
    # Each `up` wrote demo-keys.env whole: a comment and a variable the user added there were
    # gone after the first (2 of 2 lines lost). The stack's lines are set where they stand.
    keys = ensure_keys(tmp_path)
    path = keys.demo_keys_file
    path.write_text(
        "# my shell's own\n" + path.read_text() + "export MY_MODEL=sim-small\nMY_OTHER=1"
    )  # the user's last line without its newline
    where = {"CACHEMESH_TARGET": "127.0.0.1:51201", "CACHEMESH_HTTP_URL": "http://127.0.0.1:51219"}
    ensure_keys(tmp_path, where)  # up
    forget_endpoints(tmp_path)  # down
    ensure_keys(tmp_path, {**where, "CACHEMESH_TARGET": "127.0.0.1:50051"})  # up again
    ensure_keys(tmp_path)  # make keys
    lines = path.read_text().splitlines()
    assert lines[0] == "# my shell's own"
    assert lines[4:6] == ["export MY_MODEL=sim-small", "MY_OTHER=1"]
    values = read_env_file(path)
    assert values["MY_MODEL"] == "sim-small" and values["MY_OTHER"] == "1"
    assert values["CACHEMESH_KEY_A"] == keys.key_for("tenant-a")
    assert values["CACHEMESH_TARGET"] == "127.0.0.1:50051"
    assert len(lines) == 8  # each of the stack's variables set once


def test_a_stack_variable_set_twice_by_the_user_is_set_once_where_it_first_stood(
    tmp_path: Path,
) -> None:
    keys = ensure_keys(tmp_path)
    path = keys.demo_keys_file
    path.write_text(path.read_text() + "export CACHEMESH_TARGET=127.0.0.1:1\nA=1\n")
    path.write_text(path.read_text() + "CACHEMESH_TARGET=127.0.0.1:2\n")
    ensure_keys(tmp_path, {"CACHEMESH_TARGET": "127.0.0.1:3", "CACHEMESH_HTTP_URL": "http://h:4"})
    lines = path.read_text().splitlines()
    assert lines[3:] == [
        "export CACHEMESH_TARGET=127.0.0.1:3",
        "A=1",
        "export CACHEMESH_HTTP_URL=http://h:4",
    ]


def test_api_keys_file_holds_only_hashes_and_the_router_reads_it(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    text = keys.api_keys_file.read_text()
    records, _ = KeyFile(keys.api_keys_file).read()
    assert [(r.tenant, r.sha256, r.name) for r in records] == [
        ("tenant-a", hash_key(keys.key_for("tenant-a")), "demo"),
        ("tenant-b", hash_key(keys.key_for("tenant-b")), "demo"),
    ]
    assert keys.key_for("tenant-a") not in text and keys.key_for("tenant-b") not in text
    table = _store(keys.api_keys_file)
    assert table.tenant_for(keys.key_for("tenant-a")) == "tenant-a"
    assert table.tenant_for(keys.key_for("tenant-b")) == "tenant-b"
    assert table.tenant_for("cm_wrong") is None


def test_running_again_keeps_a_revoked_demo_key_revoked(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    store = _store(keys.api_keys_file)
    demo_a = next(r for r in store.records() if r.tenant == "tenant-a")
    store.revoke(demo_a.id)
    ensure_keys(tmp_path)
    assert _store(keys.api_keys_file).tenant_for(keys.key_for("tenant-a")) is None


def test_revoked_and_removed_demo_keys_are_not_minted_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An operator retires the demo tenants (revokes their keys) and deletes the clear-text
    # file: the next make up / make keys minted two new working keys, added them to the live
    # key file and printed them.
    keys = ensure_keys(tmp_path)
    store = _store(keys.api_keys_file)
    for record in store.records():
        store.revoke(record.id)
    keys.demo_keys_file.unlink()
    key_file = keys.api_keys_file.read_text()
    again = ensure_keys(tmp_path)
    assert [r.tenant for r in _store(keys.api_keys_file).records() if r.active] == []
    assert keys.api_keys_file.read_text() == key_file
    assert not again.created and not again.has_demo_keys
    assert not again.demo_keys_file.exists()
    assert again.internal_token == keys.internal_token
    assert main(["--run-dir", str(tmp_path)]) == 0  # make keys: says so, mints nothing
    said = capsys.readouterr().out
    assert "demo API keys: unavailable" in said and "cachemesh admin keys create" in said
    assert "cm_" not in said
    with pytest.raises(KeyError, match="unavailable"):
        again.key_for("tenant-a")


def test_a_fresh_install_mints_the_demo_keys_once(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path)
    assert first.created and first.has_demo_keys
    assert ensure_keys(tmp_path).api_keys == first.api_keys


def test_the_demo_without_keys_says_how_to_get_some(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'clients' / 'python'}"}
    done = subprocess.run(
        [sys.executable, "-m", "cachemesh.demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "CACHEMESH_KEY_A is not set" in done.stderr
    assert "cachemesh admin keys create" in done.stderr


def test_make_keys_needs_only_the_standard_library(tmp_path: Path) -> None:
    """``python3 -m services.tools.keys`` with the system's Python, without the venv."""
    python = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable
    done = subprocess.run(
        [python, "-I", "-c", "import sys; sys.path.insert(0, '.'); "
         "from services.tools.keys import main; main(['--run-dir', sys.argv[1]])",
         str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "CACHEMESH_KEY_A=cm_" in done.stdout
    assert (tmp_path / "run" / "api-keys").is_file()


def test_internal_token_file_holds_the_token_compose_mounts(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    assert len(keys.internal_token) >= 16
    assert (tmp_path / "internal-token").read_text().strip() == keys.internal_token
    # compose mounts the file (CACHEMESH_INTERNAL_TOKEN_FILE): no env file holds it now
    assert not (tmp_path / "internal.env").exists()
    assert len(keys.admin_token) >= 16 and keys.admin_token != keys.internal_token
    assert (tmp_path / "admin-token").read_text().strip() == keys.admin_token
    assert not (tmp_path / "admin.env").exists()  # compose mounts admin-token itself
    assert keys.env() == {
        "CACHEMESH_API_KEYS_FILE": str(tmp_path / "api-keys"),
        "CACHEMESH_INTERNAL_TOKEN": keys.internal_token,
        "CACHEMESH_ADMIN_TOKEN_FILE": str(tmp_path / "admin-token"),
    }


def test_every_secret_is_private(tmp_path: Path) -> None:
    run = tmp_path / ".run"
    ensure_keys(run)
    assert _mode(run) == 0o700
    assert _mode(run / "demo-keys.env") == 0o600
    # readable by a container's non-root user (compose mounts them); .run (0700) keeps them
    # from this host's other users
    assert _mode(run / "api-keys") == 0o644  # hashes only
    for name in ("admin-token", "internal-token", "redis-password"):
        assert _mode(run / name) == 0o644, name
    assert sorted(p.name for p in run.iterdir()) == [
        ".api-keys.lock",
        "admin-token",
        "api-keys",
        "demo-keys.env",
        "internal-token",
        "redis-password",
    ]  # no temporary file left behind


def test_an_older_install_keeps_its_compose_env_files_and_opens_the_mounted_ones(
    tmp_path: Path,
) -> None:
    """An older version wrote internal.env, redis.env and redis-urls.env for compose's
    env_file (no longer read: left as they are) and the token and password 0600 (unreadable
    through compose's secret mount by the containers' uid 10001)."""
    first = ensure_keys(tmp_path)
    for name in ("internal-token", "redis-password"):
        (tmp_path / name).chmod(0o600)
    older = {"internal.env": f"CACHEMESH_INTERNAL_TOKEN={first.internal_token}\n"}
    older["redis.env"] = f"REDISCLI_AUTH={first.redis_password}\n"
    for name, text in older.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    again = ensure_keys(tmp_path)
    assert again.internal_token == first.internal_token
    assert again.redis_password == first.redis_password
    for name in ("internal-token", "redis-password"):
        assert _mode(tmp_path / name) == 0o644, name
    for name, text in older.items():
        assert (tmp_path / name).read_text() == text and _mode(tmp_path / name) == 0o600


def test_an_older_install_keeps_its_admin_token_readable_by_compose_and_its_admin_env(
    tmp_path: Path,
) -> None:
    """An older version wrote the token 0600 (unreadable through compose's secret mount by the
    containers' uid 10001) and admin.env for compose's env_file: make keys keeps the token,
    opens it to the containers' user inside the 0700 run dir, and leaves admin.env alone (no
    longer read by anything)."""
    first = ensure_keys(tmp_path)
    (tmp_path / "admin-token").chmod(0o600)
    older = f"CACHEMESH_ADMIN_TOKEN={first.admin_token}\n"
    (tmp_path / "admin.env").write_text(older)
    (tmp_path / "admin.env").chmod(0o600)
    again = ensure_keys(tmp_path)
    assert again.admin_token == first.admin_token and not again.created
    assert _mode(tmp_path / "admin-token") == 0o644 and _mode(tmp_path) == 0o700
    assert (tmp_path / "admin.env").read_text() == older
    assert _mode(tmp_path / "admin.env") == 0o600


def test_running_again_keeps_the_secrets(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path)
    contents = {p.name: p.read_text() for p in tmp_path.iterdir()}
    second = ensure_keys(tmp_path)
    assert not second.created
    assert second.api_keys == first.api_keys
    assert second.internal_token == first.internal_token
    assert second.admin_token == first.admin_token
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == contents


def test_a_lost_derived_file_is_rebuilt_from_the_kept_secrets(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path)
    (tmp_path / "api-keys").unlink()
    (tmp_path / "demo-keys.env").chmod(0o644)
    second = ensure_keys(tmp_path)
    assert not second.created
    assert second.api_keys == first.api_keys
    assert _store(tmp_path / "api-keys").tenant_for(first.key_for("tenant-b"))
    assert _mode(tmp_path / "demo-keys.env") == 0o600


def test_each_install_gets_its_own_secrets(tmp_path: Path) -> None:
    one = ensure_keys(tmp_path / "one")
    two = ensure_keys(tmp_path / "two")
    assert set(one.api_keys.values()).isdisjoint(two.api_keys.values())
    assert one.internal_token != two.internal_token


def test_every_key_character_reads_back_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """demo-keys.env is read by the project's one .env reader (``make up``), by a shell
    (``source``: make demo) and by ``ensure_keys`` itself: each reads every character of a key
    (cm_ and the URL-safe alphabet) and the admin token's path (here with a space) the same."""
    alphabet = string.ascii_letters + string.digits + "-_"
    minted = iter([f"cm_{alphabet}", f"cm_{alphabet[::-1]}"])
    monkeypatch.setattr(keys_module, "new_api_key", lambda: next(minted))
    run = tmp_path / "a run dir" / ".run"
    keys = ensure_keys(run)
    written = {"CACHEMESH_KEY_A": f"cm_{alphabet}", "CACHEMESH_KEY_B": f"cm_{alphabet[::-1]}"}
    assert [keys.key_for("tenant-a"), keys.key_for("tenant-b")] == list(written.values())
    written["CACHEMESH_ADMIN_TOKEN_FILE"] = str(keys.admin_token_file)
    assert read_env_file(keys.demo_keys_file) == written
    script = f"set -e; source '{keys.demo_keys_file}'; env"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert {name: exported.get(name) for name in written} == written
    again = ensure_keys(run)
    assert not again.created and again.api_keys == keys.api_keys
    assert read_env_file(keys.demo_keys_file) == written


def test_a_demo_keys_line_read_otherwise_elsewhere_is_refused_naming_it(tmp_path: Path) -> None:
    """A demo-keys.env edited by hand with a comment after a key, its key file gone: keys.py's
    own reader took 'cm_... # tenant-a' for the key and rebuilt the key file with its hash,
    while the shell that sources the file (make demo) sends 'cm_...': every demo call
    UNAUTHENTICATED. The one reader refuses the line, naming it."""
    keys = ensure_keys(tmp_path)
    a, b = keys.key_for("tenant-a"), keys.key_for("tenant-b")
    keys.demo_keys_file.write_text(
        f"export CACHEMESH_KEY_A={a} # tenant-a\nexport CACHEMESH_KEY_B={b}\n"
    )
    keys.api_keys_file.unlink()
    with pytest.raises(EnvFileError, match=r"demo-keys\.env:1: a space and #"):
        ensure_keys(tmp_path)
    assert not keys.api_keys_file.exists()


def test_make_keys_writes_the_run_dirs_keys(tmp_path: Path) -> None:
    """make keys RUN_DIR=<dir> printed (or minted) .run's keys, and left <dir> without any."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "keys", f"RUN_DIR={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    demo = read_env_file(run / "demo-keys.env")
    assert demo["CACHEMESH_KEY_A"] in done.stdout  # the keys it printed are that stack's
    assert (run / "api-keys").is_file()


def test_a_secret_is_durable_before_it_replaces_the_old_one_and_its_name_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the key store's writer: the new file's data is fsynced before the rename (a crash
    after it never leaves an empty secret under the name), the directory after it (the
    rename itself survives a crash)."""
    done: list[str] = []
    fsync, replace = os.fsync, os.replace

    def fsynced(fd: int) -> None:
        info = os.fstat(fd)
        done.append("fsync directory" if stat.S_ISDIR(info.st_mode) else f"fsync {info.st_size}")
        fsync(fd)

    def replaced(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        done.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsynced)
    monkeypatch.setattr(os, "replace", replaced)
    keys_module.write_secret(tmp_path / "admin-token", "s3cret-token\n")
    assert done == ["fsync 13", "rename", "fsync directory"]
    assert (tmp_path / "admin-token").read_text() == "s3cret-token\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin-token"]


def test_what_up_says_of_the_keys_names_their_file_never_their_values(tmp_path: Path) -> None:
    """The first ``make up`` printed both demo API keys (terminal scrollback, CI logs): it
    names where they are and how to print them on request (``make keys``)."""
    keys = ensure_keys(tmp_path)
    said = announce(keys)
    assert keys.created and "demo API keys (generated)" in said
    assert str(keys.demo_keys_file) in said and "make keys" in said
    assert all(value not in said for value in keys.api_keys.values())
    assert keys.admin_token_file.read_text().strip() not in said
    shown = describe(keys)  # make keys: on request
    assert all(value in shown for value in keys.api_keys.values())
