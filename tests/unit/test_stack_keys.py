"""services.tools.stack.keys: this install's secrets, generated once, hashed, private."""

from __future__ import annotations

import stat
from pathlib import Path

from cachemesh.envfile import read_env_file
from services.common.auth import ApiKeys, hash_key
from services.tools.stack.keys import ensure_keys


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generates_two_tenants_keys_in_the_documented_files(tmp_path: Path) -> None:
    run = tmp_path / ".run"
    keys = ensure_keys(run)
    assert keys.created
    demo = read_env_file(run / "demo-keys.env")
    assert set(demo) == {"CACHEMESH_KEY_A", "CACHEMESH_KEY_B"}
    assert demo["CACHEMESH_KEY_A"] == keys.key_for("tenant-a")
    assert demo["CACHEMESH_KEY_B"] == keys.key_for("tenant-b")
    assert demo["CACHEMESH_KEY_A"] != demo["CACHEMESH_KEY_B"]
    assert all(key.startswith("cm_") and len(key) > 40 for key in demo.values())


def test_api_keys_file_holds_only_hashes_and_the_router_reads_it(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    text = keys.api_keys_file.read_text()
    assert text.splitlines() == [
        f"tenant-a:{hash_key(keys.key_for('tenant-a'))}",
        f"tenant-b:{hash_key(keys.key_for('tenant-b'))}",
    ]
    assert keys.key_for("tenant-a") not in text
    table = ApiKeys.from_file(keys.api_keys_file)
    assert table.tenant_for(keys.key_for("tenant-a")) == "tenant-a"
    assert table.tenant_for(keys.key_for("tenant-b")) == "tenant-b"
    assert table.tenant_for("cm_wrong") is None


def test_internal_token_file_and_compose_env_file_agree(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    assert len(keys.internal_token) >= 16
    assert (tmp_path / "internal-token").read_text().strip() == keys.internal_token
    compose_env = read_env_file(tmp_path / "internal.env")
    assert compose_env == {"CACHEMESH_INTERNAL_TOKEN": keys.internal_token}
    assert keys.env() == {
        "CACHEMESH_API_KEYS_FILE": str(tmp_path / "api-keys"),
        "CACHEMESH_INTERNAL_TOKEN": keys.internal_token,
    }


def test_every_secret_is_private(tmp_path: Path) -> None:
    run = tmp_path / ".run"
    ensure_keys(run)
    assert _mode(run) == 0o700
    for name in ("demo-keys.env", "api-keys", "internal-token", "internal.env"):
        assert _mode(run / name) == 0o600, name
    assert sorted(p.name for p in run.iterdir()) == [
        "api-keys",
        "demo-keys.env",
        "internal-token",
        "internal.env",
    ]  # no temporary file left behind


def test_running_again_keeps_the_secrets(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path)
    contents = {p.name: p.read_text() for p in tmp_path.iterdir()}
    second = ensure_keys(tmp_path)
    assert not second.created
    assert second.api_keys == first.api_keys
    assert second.internal_token == first.internal_token
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == contents


def test_a_lost_derived_file_is_rebuilt_from_the_kept_secrets(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path)
    (tmp_path / "api-keys").unlink()
    (tmp_path / "internal.env").unlink()
    (tmp_path / "demo-keys.env").chmod(0o644)
    second = ensure_keys(tmp_path)
    assert not second.created
    assert second.api_keys == first.api_keys
    assert ApiKeys.from_file(tmp_path / "api-keys").tenant_for(first.key_for("tenant-b"))
    assert read_env_file(tmp_path / "internal.env")["CACHEMESH_INTERNAL_TOKEN"] == (
        first.internal_token
    )
    assert _mode(tmp_path / "demo-keys.env") == 0o600


def test_each_install_gets_its_own_secrets(tmp_path: Path) -> None:
    one = ensure_keys(tmp_path / "one")
    two = ensure_keys(tmp_path / "two")
    assert set(one.api_keys.values()).isdisjoint(two.api_keys.values())
    assert one.internal_token != two.internal_token
