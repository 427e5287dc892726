"""The stack's own Redis requires the run dir's generated password: made once with the other
secrets, given to redis-server in a 0600 config file (never its command line), put into the
Redis URLs of the services that use it (no other process), its files private; a running stack
an older version started without one is refused, not adopted with URLs its Redis rejects."""

from __future__ import annotations

import dataclasses
import io
import os
import stat
from pathlib import Path

import pytest

from cachemesh.envfile import EnvFileError
from services.tools.keys import ensure_keys
from services.tools.stack.lifecycle import Stack
from services.tools.stack.redis_process import REDIS, REDIS_UMASK, private_data_dir
from services.tools.stack.service_table import SERVICES, service
from services.tools.stack.supervisor import Plan

URLS = {
    "PREFIX_CACHE_REDIS_URL": "redis://127.0.0.1:50056/0",
    "ROUTER_LIMITS_REDIS_URL": "redis://127.0.0.1:50056/1",
    "ROUTER_ANSWERS_REDIS_URL": "redis://127.0.0.1:50056/2",
}
USERS = {
    "prefix-cache": {"PREFIX_CACHE_REDIS_URL"},
    "router": set(URLS) - {"PREFIX_CACHE_REDIS_URL"},
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _stack(tmp_path: Path, environ: dict[str, str] | None = None) -> Stack:
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in URLS.items()))
    shell = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(environ or {})}
    return Stack(tmp_path, tmp_path / "run", environ=shell, out=io.StringIO())


def test_the_password_is_made_once_private_and_an_older_run_dir_gets_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    keys = ensure_keys(run)
    password = keys.redis_password
    assert len(password) >= 32 and (run / "redis-password").read_text() == password + "\n"
    # compose mounts this file (its redis service, the router's and prefix-cache's
    # CACHEMESH_REDIS_PASSWORD_FILE): no env file holds the password any more
    assert not (run / "redis.env").exists() and not (run / "redis-urls.env").exists()
    assert _mode(run / "redis-password") == 0o644  # the containers' user; .run is 0700
    assert ensure_keys(run).redis_password == password  # kept
    # a run dir made before the password existed: the next make keys / make up makes it
    (run / "redis-password").unlink()
    again = ensure_keys(run)
    assert again.redis_password not in ("", password)
    assert not again.created  # make up does not print the demo keys as "generated" again
    assert again.api_keys == keys.api_keys and again.internal_token == keys.internal_token


def test_a_password_that_would_not_survive_a_url_or_config_file_is_refused(
    tmp_path: Path,
) -> None:
    ensure_keys(tmp_path)
    (tmp_path / "redis-password").write_text("with space@and#hash-0123456789\n")
    with pytest.raises(EnvFileError, match="redis-password") as refused:
        ensure_keys(tmp_path)
    assert "with space" not in str(refused.value)


def test_only_the_services_that_use_the_stacks_redis_get_its_password(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    keys = ensure_keys(stack.run_dir)
    password = keys.redis_password
    assert password not in repr(stack.settings())  # what status, ports.env and errors see
    for spec in SERVICES:
        env = stack.environment(spec, keys)
        uses = USERS.get(spec.name, set())
        for var in uses:
            assert env[var] == URLS[var].replace("//", f"//:{password}@"), (spec.name, var)
        assert not any(password in v for k, v in env.items() if k not in uses), spec.name


def test_a_redis_url_elsewhere_is_left_as_it_is(tmp_path: Path) -> None:
    theirs = "redis://:theirs@redis.internal:6379/1"
    stack = _stack(tmp_path, {"ROUTER_LIMITS_REDIS_URL": theirs})
    keys = ensure_keys(stack.run_dir)
    env = stack.environment(service("router"), keys)
    assert env["ROUTER_LIMITS_REDIS_URL"] == theirs
    assert keys.redis_password in env["ROUTER_ANSWERS_REDIS_URL"]


def test_redis_gets_its_password_from_a_private_file_and_keeps_its_files_private(
    tmp_path: Path,
) -> None:
    stack = _stack(tmp_path)
    keys = ensure_keys(stack.run_dir)
    data = stack.run_dir / "data" / "redis"
    (data / "appendonlydir").mkdir(parents=True, mode=0o755)
    (data / "appendonlydir" / "appendonly.aof.1.incr.aof").write_text("")
    os.chmod(data / "appendonlydir" / "appendonly.aof.1.incr.aof", 0o644)  # an older stack's
    managed = stack._managed_process(REDIS, keys, 0)
    assert not any(keys.redis_password in arg for arg in managed.argv)  # ps shows argv
    config = stack.run_dir / "redis.conf"
    assert str(config) in managed.argv and _mode(config) == 0o600
    assert config.read_text() == f"requirepass {keys.redis_password}\n"
    assert managed.umask == REDIS_UMASK == 0o077  # what the server writes: 0600
    assert managed.redis_password == keys.redis_password  # the supervisor's readiness probe
    assert _mode(data) == _mode(data / "appendonlydir") == 0o700
    assert _mode(data / "appendonlydir" / "appendonly.aof.1.incr.aof") == 0o600


def test_private_data_dir_makes_a_missing_dir_0700(tmp_path: Path) -> None:
    private_data_dir(tmp_path / "data" / "redis")
    assert _mode(tmp_path / "data" / "redis") == 0o700


def test_a_running_stack_whose_redis_has_no_password_is_refused_not_adopted(
    tmp_path: Path,
) -> None:
    """``make up`` over a stack an older version started: its Redis takes no password, its
    services' URLs have none. Adopting it would leave them so (and a service restarted with
    the new URLs would be refused by that Redis): up says what to do instead."""
    stack = _stack(tmp_path)
    keys = ensure_keys(stack.run_dir)
    managed = stack.managed()
    current = [stack._managed_process(s, keys, 0) for s in managed]
    older = [
        dataclasses.replace(
            m,
            argv=[a for a in m.argv if not a.endswith("redis.conf")],
            env={k: URLS.get(k, v) for k, v in m.env.items()},
            redis_password="",
        )
        for m in current
    ]
    Plan(str(tmp_path), 1.0, older).write(stack.run_dir)
    changed = stack.changed_settings(keys, managed)
    assert "redis: no password (started by an older version)" in changed
    assert "prefix-cache: PREFIX_CACHE_REDIS_URL" in changed
    assert "router: ROUTER_ANSWERS_REDIS_URL, ROUTER_LIMITS_REDIS_URL" in changed
    assert keys.redis_password not in "; ".join(changed)
    Plan(str(tmp_path), 1.0, current).write(stack.run_dir)
    assert stack.changed_settings(keys, managed) == []
