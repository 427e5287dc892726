"""A URL with a password is for a Redis that asks for it. redis-py authenticates with ``HELLO 3
AUTH default <password>``, which a Redis without a password accepts, so a service whose Redis
died and whose port another, password-less Redis took read and wrote that Redis's keys with no
error (5 of 5 calls answered from it). Now every new connection, the first and each reconnect,
is refused there, naming the variable and never the password; the services meet it as a Redis
that refuses their password: a ``ConfigError`` at start-up, a failing Redis once running.
Against real redis-servers (tests/redis_server.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError

from services.common.env import ConfigError
from services.common.redis_pool import bounded_redis, own_connection_redis
from services.prefix_cache.redis_health import REDIS_URL, RedisHealth
from services.router.limit_wiring import ANSWERS_REDIS_URL, build_answer_ledger
from services.tools.stack.ports import free_port
from tests.redis_server import client_of, redis_server, require_password, sync_client_of

PASSWORD = "S3cretPassw0rd"
THEIRS = "cachemesh:warm:theirs"


def _with_password(url: str, user: str = "") -> str:
    return url.replace("redis://", f"redis://{user}:{PASSWORD}@")


async def _put(url: str, key: str, value: bytes) -> None:
    client = client_of(url)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def _get(url: str, key: str) -> bytes | str | None:
    client = client_of(url)
    try:
        value: bytes | str | None = await client.get(key)
        return value
    finally:
        await client.aclose()


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[str]:
    """Another Redis, without a password, holding a key of its own: its URL (none)."""
    (tmp_path / "foreign").mkdir()
    with redis_server(tmp_path / "foreign") as url:
        client = sync_client_of(url)
        client.set(THEIRS, b"kept")
        client.close()
        yield url


def _refusal_is_clear(exc: BaseException, var: str) -> None:
    text = str(exc)
    assert text.startswith(f"AUTH with the password of {var} not accepted (it has no password)")
    assert f"name the right Redis in {var}" in text and PASSWORD not in text


async def test_a_redis_without_a_password_is_refused_to_a_url_with_one(foreign: str) -> None:
    """Before: 5 of 5 calls (reads and writes) answered by the password-less Redis."""
    client = bounded_redis("SOME_REDIS_URL", _with_password(foreign), 4, 2.0)
    try:
        for call in (client.get(THEIRS), client.set(THEIRS, b"ours"), client.ping()):
            with pytest.raises(AuthenticationError) as refused:
                await call
            _refusal_is_clear(refused.value, "SOME_REDIS_URL")
    finally:
        await client.aclose()
    assert await _get(foreign, THEIRS) == b"kept"


async def test_the_redis_with_the_password_is_used_and_an_acl_user_too(tmp_path: Path) -> None:
    """The check costs nothing where the password is asked: the Redis that has it answers (its
    ``default`` user, and an ACL user, whose connection the check leaves as that user's)."""
    with redis_server(tmp_path) as url:
        admin = client_of(url)
        await admin.acl_setuser(
            "app",
            enabled=True,
            passwords=[f"+{PASSWORD}"],
            keys=["cachemesh:*"],
            commands=["+@all"],
        )
        await admin.aclose()
        await require_password(url, PASSWORD)
        for user in ("", "default", "app"):
            client = bounded_redis("SOME_REDIS_URL", _with_password(url, user), 4, 2.0)
            try:
                assert await client.set(f"cachemesh:{user}", b"1")
                name = user or "default"
                assert await client.acl_whoami() in (name, name.encode())
            finally:
                await client.aclose()


async def test_a_redis_whose_auth_is_renamed_is_refused_naming_both_causes(tmp_path: Path) -> None:
    """The Redis the password is for, its AUTH renamed away (``rename-command``): HELLO's AUTH
    still takes the password, the check's legacy AUTH is an unknown command, as it would be on
    a password-less Redis with AUTH renamed. Refused, and said so (before: "not the Redis that
    password is for (another Redis on its port, or one started without requirepass)", which
    sent its operator looking for another Redis); the way out it names (an ACL user) works."""
    with redis_server(tmp_path, extra_args=("--rename-command", "AUTH", "")) as url:
        admin = client_of(url)
        await admin.acl_setuser(
            "app", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"]
        )
        await admin.aclose()
        await require_password(url, PASSWORD)
        client = bounded_redis("SOME_REDIS_URL", _with_password(url), 4, 2.0)
        try:
            with pytest.raises(AuthenticationError) as refused:
                await client.ping()
        finally:
            await client.aclose()
        text = str(refused.value)
        assert text.startswith("AUTH with the password of SOME_REDIS_URL answered an error")
        assert "AUTH renamed or disabled on that Redis (rename-command)" in text
        assert "or not the Redis that password is for" in text and PASSWORD not in text
        assert "name an ACL user in SOME_REDIS_URL" in text
        user = bounded_redis("SOME_REDIS_URL", _with_password(url, "app"), 4, 2.0)
        try:
            assert await user.set("cachemesh:app", b"1")
        finally:
            await user.aclose()


async def test_a_reconnect_to_a_redis_without_the_password_is_refused(tmp_path: Path) -> None:
    """Its Redis died and another, password-less, took its port: the next call reconnects
    and is refused (before: it read the other Redis's key)."""
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    client = bounded_redis("SOME_REDIS_URL", url, 1, 2.0)
    try:
        (tmp_path / "ours").mkdir()
        with redis_server(tmp_path / "ours", port=port) as ours:
            await require_password(ours, PASSWORD)
            assert await client.set("cachemesh:ours", b"1")
        (tmp_path / "theirs").mkdir()
        with redis_server(tmp_path / "theirs", port=port) as theirs:
            await _put(theirs, THEIRS, b"kept")
            with pytest.raises(AuthenticationError) as refused:
                await client.get(THEIRS)
            _refusal_is_clear(refused.value, "SOME_REDIS_URL")
            assert await _get(theirs, THEIRS) == b"kept"
    finally:
        await client.aclose()


class Health:
    def __init__(self) -> None:
        self.told: list[bool] = []

    async def set(self, serving: bool) -> None:
        self.told.append(serving)


async def test_prefix_cache_refuses_it_at_start_up_and_is_not_serving_on_a_reconnect(
    foreign: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At start-up a misconfiguration (``ConfigError`` naming PREFIX_CACHE_REDIS_URL), as a
    wrong password is; once running, the Redis's failure (NOT_SERVING, its calls UNAVAILABLE)
    until its own Redis is back. Before: SERVING on the other Redis."""
    health = Health()
    client = own_connection_redis(REDIS_URL, _with_password(foreign), 2.0)
    watch = RedisHealth(client, _with_password(foreign), health.set, timeout_s=2.0)
    with pytest.raises(ConfigError, match=f"^{REDIS_URL}: Redis at redis://:\\*\\*\\*@") as bad:
        await watch.start()
    assert "it has no password" in str(bad.value) and PASSWORD not in str(bad.value)
    await client.aclose()

    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    client = own_connection_redis(REDIS_URL, url, 2.0)
    watch = RedisHealth(client, url, health.set, timeout_s=2.0)
    (tmp_path / "ours").mkdir()
    with redis_server(tmp_path / "ours", port=port) as ours:
        await require_password(ours, PASSWORD)
        await watch.start()
    (tmp_path / "theirs").mkdir()
    with redis_server(tmp_path / "theirs", port=port):
        await watch.check()
        await watch.check()
    assert health.told == [True, False]
    (tmp_path / "back").mkdir()
    with redis_server(tmp_path / "back", port=port) as back:  # its own Redis again
        await require_password(back, PASSWORD)
        await watch.check()
    assert health.told == [True, False, True]
    # the connection the restart closed, then the refusal of the new one, said as such
    # (before: only the first, as a Redis that "does not answer"), then SERVING again
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    closed, refused, again = warned
    assert "does not answer" in closed
    assert f"{REDIS_URL}: Redis at redis://:***@127.0.0.1:{port}/0 refuses" in refused
    assert "NOT_SERVING" in refused and "it has no password" in refused
    assert "answers again: SERVING" in again
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    await client.aclose()


async def test_the_routers_answer_ledger_refuses_it_at_start_up(foreign: str) -> None:
    """The router's Redis clients (limits, answer ledger) start through the same first call:
    refused there, the router stops naming the variable (before: it used the other Redis)."""

    def failed(operation: object) -> None:
        raise AssertionError(operation)  # pragma: no cover

    with pytest.raises(ConfigError, match=f"^{ANSWERS_REDIS_URL}: ") as bad:
        await build_answer_ledger(_with_password(foreign), 60.0, 4, 2.0, failed)
    assert "it has no password" in str(bad.value) and PASSWORD not in str(bad.value)
