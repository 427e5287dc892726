"""The internal token and Redis's password from mounted files (``*_FILE``), checked at start.

docker compose put ``CACHEMESH_INTERNAL_TOKEN`` and the Redis URLs carrying the password in
the containers' environment (``docker inspect`` showed them: 11 variables in 6 services). The
services now read ``CACHEMESH_INTERNAL_TOKEN_FILE`` and ``CACHEMESH_REDIS_PASSWORD_FILE`` (the
password put into each Redis URL the service reads), as the admin token's
``CACHEMESH_ADMIN_TOKEN_FILE``: a missing, unreadable, empty or oversized file stops the start
naming the variable, and so does a value given both ways.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from services.common.auth import internal_token_from_env
from services.common.env import MAX_SECRET_BYTES, ConfigError, Env
from services.common.models import load_model_table
from services.model.settings import ModelSettings
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.limit_settings import LimitSettings
from services.router.settings import RouterSettings

TOKEN = "internal-token-from-a-file-0123456789"
PASSWORD = "the-redis-password-0123456789"
TABLE = load_model_table()
REPLICAS = {  # what the router requires besides
    "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
    "CACHEMESH_API_KEYS_FILE": "/nonexistent",
}


def _file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def test_the_internal_token_is_read_from_its_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "internal-token", TOKEN + "\n")
    assert internal_token_from_env(Env({"CACHEMESH_INTERNAL_TOKEN_FILE": path})) == TOKEN
    assert internal_token_from_env(Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN})) == TOKEN


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read"),  # no such file
        ("", "is empty"),
        ("  \n", "is empty"),
        (TOKEN + "\nsecond line\n", "one line"),
        ("x" * (MAX_SECRET_BYTES + 1), "larger than 64 KiB"),
        ("short", "at least 16"),  # the token's own rule, the file's content
    ],
)
def test_a_bad_internal_token_file_stops_the_start_naming_the_variable(
    tmp_path: Path, content: str | None, why: str
) -> None:
    path = str(tmp_path / "token") if content is None else _file(tmp_path, "token", content)
    with pytest.raises(ConfigError, match=why) as refused:
        internal_token_from_env(Env({"CACHEMESH_INTERNAL_TOKEN_FILE": path}))
    assert "CACHEMESH_INTERNAL_TOKEN" in str(refused.value)
    assert "second line" not in str(refused.value) and "xxxx" not in str(refused.value)


def test_an_unreadable_or_directory_token_file_names_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CACHEMESH_INTERNAL_TOKEN_FILE: cannot read .*irectory"):
        internal_token_from_env(Env({"CACHEMESH_INTERNAL_TOKEN_FILE": str(tmp_path)}))
    if os.geteuid() != 0:  # root reads a 0000 file
        path = _file(tmp_path, "private", TOKEN)
        os.chmod(path, 0)
        with pytest.raises(ConfigError, match="CACHEMESH_INTERNAL_TOKEN_FILE: cannot read"):
            internal_token_from_env(Env({"CACHEMESH_INTERNAL_TOKEN_FILE": path}))


def test_the_internal_token_given_both_ways_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, "internal-token", TOKEN)
    both = {"CACHEMESH_INTERNAL_TOKEN": TOKEN, "CACHEMESH_INTERNAL_TOKEN_FILE": path}
    with pytest.raises(ConfigError, match="not both") as refused:
        internal_token_from_env(Env(both))
    assert TOKEN not in str(refused.value)
    with pytest.raises(ConfigError, match="CACHEMESH_INTERNAL_TOKEN_FILE"):
        internal_token_from_env(Env({}))  # neither: says both ways


def test_every_internal_service_reads_the_token_file(tmp_path: Path) -> None:
    environ = {"CACHEMESH_INTERNAL_TOKEN_FILE": _file(tmp_path, "t", TOKEN), **REPLICAS}
    env = Env(environ)
    assert PrefixCacheSettings.from_env(env).internal_token == TOKEN
    assert ModelSettings.from_env(environ).internal_token == TOKEN
    assert RouterSettings.from_env(env, TABLE).internal_token == TOKEN


def _password_of(url: str | None) -> str:
    assert url is not None
    return unquote(urlsplit(url).password or "")


@pytest.mark.parametrize(
    ("url", "given"),
    [
        ("redis://redis:6379/0", "redis://:{pw}@redis:6379/0"),
        ("rediss://cache.internal:6380/2", "rediss://:{pw}@cache.internal:6380/2"),
        ("redis://app@redis:6379/1", "redis://app:{pw}@redis:6379/1"),  # an ACL user kept
    ],
)
def test_the_redis_password_file_goes_into_the_url(tmp_path: Path, url: str, given: str) -> None:
    path = _file(tmp_path, "redis-password", PASSWORD + "\n")
    env = Env({"PREFIX_CACHE_REDIS_URL": url, "CACHEMESH_REDIS_PASSWORD_FILE": path})
    assert env.redis_url("PREFIX_CACHE_REDIS_URL") == given.format(pw=PASSWORD)


def test_a_password_with_url_characters_is_escaped(tmp_path: Path) -> None:
    odd = "p@ss:w/rd?#%"
    env = Env(
        {
            "ROUTER_LIMITS_REDIS_URL": "redis://redis:6379/1",
            "CACHEMESH_REDIS_PASSWORD_FILE": _file(tmp_path, "pw", odd),
        }
    )
    url = env.redis_url("ROUTER_LIMITS_REDIS_URL")
    assert _password_of(url) == odd and urlsplit(url).hostname == "redis"


def test_each_service_reading_redis_puts_the_password_in_its_urls(tmp_path: Path) -> None:
    env = Env(
        {
            "CACHEMESH_INTERNAL_TOKEN": TOKEN,
            "CACHEMESH_REDIS_PASSWORD_FILE": _file(tmp_path, "pw", PASSWORD),
            "PREFIX_CACHE_REDIS_URL": "redis://redis:6379/0",
            "ROUTER_LIMITS_REDIS_URL": "redis://redis:6379/1",
            "ROUTER_ANSWERS_REDIS_URL": "redis://redis:6379/2",
            **REPLICAS,
        }
    )
    assert _password_of(PrefixCacheSettings.from_env(env).redis_url) == PASSWORD
    assert _password_of(LimitSettings.from_env(env).redis_url) == PASSWORD
    assert _password_of(RouterSettings.from_env(env, TABLE).answers_redis_url) == PASSWORD


def test_a_url_unset_stays_unset_but_the_file_is_still_checked(tmp_path: Path) -> None:
    path = _file(tmp_path, "pw", PASSWORD)
    assert Env({"CACHEMESH_REDIS_PASSWORD_FILE": path}).redis_url("PREFIX_CACHE_REDIS_URL") is None
    missing = Env({"CACHEMESH_REDIS_PASSWORD_FILE": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="CACHEMESH_REDIS_PASSWORD_FILE: cannot read"):
        missing.redis_url("PREFIX_CACHE_REDIS_URL")
    empty = Env({"CACHEMESH_REDIS_PASSWORD_FILE": _file(tmp_path, "empty", "\n")})
    with pytest.raises(ConfigError, match=r"CACHEMESH_REDIS_PASSWORD_FILE: .* is empty"):
        empty.redis_url("PREFIX_CACHE_REDIS_URL")


def test_a_url_carrying_a_password_beside_the_file_is_refused(tmp_path: Path) -> None:
    env = Env(
        {
            "PREFIX_CACHE_REDIS_URL": "redis://:inline-secret@redis:6379/0",
            "CACHEMESH_REDIS_PASSWORD_FILE": _file(tmp_path, "pw", PASSWORD),
        }
    )
    with pytest.raises(ConfigError, match="PREFIX_CACHE_REDIS_URL carries a password") as refused:
        env.redis_url("PREFIX_CACHE_REDIS_URL")
    assert "inline-secret" not in str(refused.value) and PASSWORD not in str(refused.value)


def test_a_unix_socket_url_with_the_file_is_refused(tmp_path: Path) -> None:
    env = Env(
        {
            "PREFIX_CACHE_REDIS_URL": "unix:///run/redis.sock",
            "CACHEMESH_REDIS_PASSWORD_FILE": _file(tmp_path, "pw", PASSWORD),
        }
    )
    with pytest.raises(ConfigError, match="redis:// and rediss://"):
        env.redis_url("PREFIX_CACHE_REDIS_URL")


def test_without_the_file_a_url_is_as_given() -> None:
    url = "redis://:inline@127.0.0.1:50056/0"
    assert Env({"PREFIX_CACHE_REDIS_URL": url}).redis_url("PREFIX_CACHE_REDIS_URL") == url
