"""The stack sets its own Redis's password (the run dir's redis-password) and puts it into the
URLs itself: a URL giving another one for that Redis is refused at start, naming the variable,
not left to fail every request with WRONGPASS."""

from __future__ import annotations

import pytest

from services.tools.stack.redis_process import stack_redis_refusal

SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    "var", ["PREFIX_CACHE_REDIS_URL", "ROUTER_ANSWERS_REDIS_URL", "ROUTER_LIMITS_REDIS_URL"]
)
def test_a_password_for_the_stacks_own_redis_is_refused_naming_the_variable(var: str) -> None:
    settings = {
        "PREFIX_CACHE_REDIS_URL": "redis://127.0.0.1:50056/0",
        var: f"redis://:{SECRET}@127.0.0.1:50056/2",
    }
    refusal = stack_redis_refusal(settings)
    assert refusal is not None
    assert var in refusal and "127.0.0.1:50056" in refusal
    assert SECRET not in refusal


@pytest.mark.parametrize(
    "settings",
    [
        {"PREFIX_CACHE_REDIS_URL": "redis://127.0.0.1:50056/0"},  # ours, no password
        {"PREFIX_CACHE_REDIS_URL": f"redis://:{SECRET}@redis.internal:6379/0"},  # not ours
        {  # a password for another Redis on loopback, not the stack's
            "PREFIX_CACHE_REDIS_URL": "redis://127.0.0.1:50056/0",
            "ROUTER_LIMITS_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:6380/1",
        },
        {"PREFIX_CACHE_REDIS_URL": ""},
    ],
)
def test_other_urls_are_left_alone(settings: dict[str, str]) -> None:
    assert stack_redis_refusal(settings) is None
