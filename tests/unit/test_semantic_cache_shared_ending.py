"""Two questions before the same document: the verifier reads them without the trailing
sentences they share (``reading.differing``), as it reads them without a shared opening."""

from __future__ import annotations

import random
import re
from functools import cache

import pytest

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.reading import differing
from services.semantic_cache.verifier import Verifier
from services.semantic_cache.wiring import build_cache, build_verifier
from tests.unit.test_semantic_cache_reading import CONFIG, embedder
from tests.unit.test_semantic_cache_rules import answer, q

_WORDS = re.findall(
    r"\S+",
    "the company reported revenue growth across its regional divisions while costs rose in "
    "logistics and staffing during the third quarter of the year",
)
_PICKS = random.Random(7)
REPORT = "Report:\n" + " ".join(_PICKS.choice(_WORDS) for _ in range(900))
# a document of lines, no sentence end in it
CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {_PICKS.randint(1, 99)}" for i in range(120))


@cache
def wired_verifier() -> Verifier:
    return build_verifier(CONFIG, embedder())  # as the service wires it (app.py)


def wired_cache() -> SemanticCache:
    return build_cache(CONFIG, embedder(), ManualClock(), verifier=wired_verifier())


def test_differing_drops_the_trailing_sentences_both_share_when_they_outweigh_the_rest() -> None:
    first = f"Summarise the report below. {REPORT}"
    second = f"Translate the report below into French. {REPORT}"
    assert differing(first, second) == (
        "Summarise the report below.",
        "Translate the report below into French.",
    )
    shared = "Report: sales grew. Costs rose. Staffing was flat."
    assert differing(f"A. B. {shared}", f"A. X. {shared}") == ("B.", "X.")
    # a shorter shared ending is read as before (the verifier's calibration)
    assert differing("A. B. C.", "A. X. C.") == ("B. C.", "X. C.")
    short = (
        "hi, I pay by card. How do I enable 2FA?",
        "hello, I pay by card. How do I enable 2FA?",
    )
    assert differing(*short) == short


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("Summarise the report below in one sentence.", "Translate the report below into French."),
        (
            "How many times does the word revenue appear below?",
            "How many times does the word costs appear below?",
        ),
        ("Summarise the following", "Translate the following into French"),
    ],
)
async def test_another_question_about_the_same_document_is_not_served(
    stored: str, asked: str
) -> None:
    """Read whole, the pair was the document both hold (cosine 0.95-0.96) and was served."""
    for document in (REPORT, CODE):
        cache = wired_cache()
        assert (await cache.store(q(f"{stored}\n\n{document}"), answer())).stored
        result = await cache.check(q(f"{asked}\n\n{document}"))
        assert not result.hit, f"served the answer of {stored!r} to {asked!r}"


async def test_the_same_question_about_the_same_document_is_still_served() -> None:
    cache = wired_cache()
    stored = "Summarise the report below in one sentence."
    assert (await cache.store(q(f"{stored}\n\n{REPORT}"), answer())).stored
    asked = "Summarize the report below in one sentence."
    result = await cache.check(q(f"{asked}\n\n{REPORT}"))
    assert result.hit and not result.exact, result.refusal
