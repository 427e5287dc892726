"""The stack's own Redis takes no password: a URL that gives one for it is refused at start, not
left to look protected while any local process reads and writes every tenant's records."""

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
