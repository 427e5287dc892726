"""The router's start-up call to each of its Redis (ROUTER_LIMITS_REDIS_URL,
ROUTER_ANSWERS_REDIS_URL) takes a refusal for now (BUSY: another client's script past
``busy-reply-threshold``) for an outage to start through, with a WARNING naming the variable,
as it does a Redis that does not answer; a refusal of the router (no permission, a database
Redis does not have) still stops it, naming the variable. Against real redis-servers
(tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.models import load_model_table
from services.common.tokens import load_tokenizers
from services.router.limit_settings import LimitSettings
from services.router.limit_wiring import build_answer_ledger, build_limiter
from tests.redis_server import client_of, redis_server

START_MS = 1_700_000_000_000
TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())
TIMEOUT_S = 10.0  # a slow test machine's connect never reads as a Redis that does not answer

Close = Callable[[], Awaitable[None]]


async def _limits(url: str) -> Close:
    env = Env(
        {
            "ROUTER_LIMIT_REQUESTS_PER_MIN": "2",
            "ROUTER_LIMITS_REDIS_URL": url,
            "ROUTER_LIMITS_TIMEOUT_S": str(TIMEOUT_S),
        }
    )
    limiter = await build_limiter(
        LimitSettings.from_env(env), ManualClock(START_MS), TABLE, TOKENIZERS
    )
    return limiter.close


async def _answers(url: str) -> Close:
    ledger = await build_answer_ledger(url, 60.0, 4, TIMEOUT_S, lambda _: None)
    assert ledger is not None
    return ledger.close


BUILDS = [
    pytest.param(_limits, "ROUTER_LIMITS_REDIS_URL", id="limits"),
    pytest.param(_answers, "ROUTER_ANSWERS_REDIS_URL", id="answers"),
]


async def _busy(url: str) -> bool:
    client = client_of(url)
    try:
        await client.ping()
        return False
    except ResponseError as exc:
        return str(exc).startswith("BUSY")
    finally:
        await client.aclose()


@asynccontextmanager
async def _script_running(url: str) -> AsyncIterator[Redis]:
    """Another client's script running past ``busy-reply-threshold`` (50 ms): every other
    command is answered BUSY until it ends. Yields an admin client (SCRIPT KILL ends it)."""
    admin = client_of(url)
    looping = client_of(url)
    await admin.config_set("busy-reply-threshold", "50")
    script = asyncio.ensure_future(looping.eval("while true do end", 0))
    try:
        for _ in range(200):
            if await _busy(url):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the script never made Redis answer BUSY")
        yield admin
    finally:
        if not script.done():
            await admin.script_kill()
        # bounded: an await with no bound on a script never killed hangs the test
        await asyncio.wait_for(asyncio.gather(script, return_exceptions=True), 10)
        await looping.aclose()
        await admin.aclose()


@pytest.mark.parametrize(("build", "var"), BUILDS)
async def test_a_redis_busy_with_a_script_at_start_up_does_not_stop_the_router(
    build: Callable[[str], Awaitable[Close]],
    var: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: ConfigError ("...: Redis at ... refused (BUSY Redis is busy running a
    script...)"), the router's exit 2 at every restart for as long as the script ran."""
    with redis_server(tmp_path) as url:
        async with _script_running(url):
            with caplog.at_level(logging.WARNING, "cachemesh.router"):
                close = await build(url)
        try:
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(var in w and "BUSY" in w and "starts without it" in w for w in warned), (
                warned
            )
        finally:
            await close()


async def _no_permission(url: str) -> str:
    """``url`` as a user Redis knows, with no permission to run any command."""
    admin = client_of(url)
    try:
        await admin.acl_setuser("nobody", enabled=True, passwords=["+Nobody-Pass-1"], keys=["*"])
    finally:
        await admin.aclose()
    return url.replace("redis://", "redis://nobody:Nobody-Pass-1@")


@pytest.mark.parametrize(("build", "var"), BUILDS)
async def test_no_permission_or_a_database_redis_does_not_have_still_stops_the_router(
    build: Callable[[str], Awaitable[Close]], var: str, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as url:
        for wrong in (await _no_permission(url), url.rsplit("/", 1)[0] + "/16"):
            with pytest.raises(ConfigError) as refused:
                await build(wrong)
            message = str(refused.value)
            assert message.startswith(f"{var}: Redis at redis://") and "refused" in message
            assert "Nobody-Pass-1" not in message
