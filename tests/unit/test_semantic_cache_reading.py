"""What the models can read of a pair (``reading.py``), with the real embedder and the shipped
verifier at the shipped operating point: a candidate they cannot tell apart is a miss."""

from __future__ import annotations

from functools import cache

import pytest

from services.common.clock import ManualClock
from services.common.env import Env
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import MiniLMEmbedder, load_minilm_embedder
from services.semantic_cache.metrics import refusal_reason
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.verifier import Verifier, VerifierWeights
from services.semantic_cache.wiring import build_cache, build_verifier
from tests.unit.test_semantic_cache_rules import answer, q

CONFIG = SemanticCacheSettings.from_env(Env({}), OperatingPoint.load())  # the shipped point


@cache
def embedder() -> MiniLMEmbedder:
    return load_minilm_embedder()


@cache
def verifier() -> Verifier:
    return build_verifier(CONFIG)


def shipped_cache(chosen: Verifier | None = None) -> SemanticCache:
    return build_cache(CONFIG, embedder(), ManualClock(), verifier=chosen or verifier())


def test_unknown_gives_the_substrings_read_as_unk_in_order() -> None:
    from services.semantic_cache.reading import shipped_reader  # new: the old code fails here

    reader = shipped_reader()
    assert reader.unknown("what does 👍 mean, and 👎?") == ("👍", "👎")
    assert reader.unknown("how do i reset my password?") == ()
    assert reader.unknown("如何删除我的账户?")[:4] == ("如", "何", "删", "除")


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("如何删除我的账户?", "如何创建我的账户?"),  # delete / create my account
        ("如何重置密码?", "如何取消订阅?"),  # reset password / cancel subscription
        ("ฉันจะรีเซ็ตรหัสผ่านได้อย่างไร", "ฉันจะยกเลิกการสมัครสมาชิกได้อย่างไร"),  # the same, Thai
        ("What does 👍 mean in a chat?", "What does 👎 mean in a chat?"),
    ],
)
async def test_questions_that_differ_only_in_unknown_characters_are_a_miss(
    stored: str, asked: str
) -> None:
    cache = shipped_cache()
    assert (await cache.store(q(stored), answer())).stored
    result = await cache.check(q(asked))
    assert not result.hit, f"served the answer of {stored!r} to {asked!r}"
    assert refusal_reason(result.refusal) == "unreadable", result.refusal
    assert (await cache.check(q(stored))).exact  # the exact path is unaffected


async def test_the_same_unknown_characters_may_still_be_served() -> None:
    cache = shipped_cache()
    await cache.store(q("What does 👍 mean in a chat?"), answer())
    assert (await cache.check(q("what does 👍 mean in chat?"))).hit
    await cache.store(q("如何删除我的账户?"), answer())
    assert (await cache.check(q("如何删除我的账户"))).hit  # punctuation only


async def test_the_guard_holds_with_the_verification_step_off() -> None:
    off = Verifier(VerifierWeights.load(), 0.0, verifier().cross_encoder)
    cache = shipped_cache(off)
    await cache.store(q("What does 👍 mean in a chat?"), answer())
    assert (await cache.check(q("What does 👍 mean in chat?"))).hit  # the step is off
    assert not (await cache.check(q("What does 👎 mean in a chat?"))).hit
