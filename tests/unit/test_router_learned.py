"""The learned router's pieces: metrics, the shipped model, the cost-aware decision, where the
embedding comes from, and the request's threshold's validation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import numpy as np
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import RequestError
from services.common.models import load_model_table
from services.router.routing.decision import decide, tier_cost
from services.router.routing.features import _CHOICE, SHAPE_FEATURES, shape_features
from services.router.routing.model import (
    RouterCard,
    RouterModel,
    RouterModelError,
    load_router_model,
)
from services.router.routing.router import FROM_EMBED, FROM_LOOKUP, LOCAL, NONE, LocalEmbedder
from services.router.validation import validate_request
from services.semantic_cache.embedder import MiniLMEmbedder, load_minilm_embedder
from services.tools.evaluation.router.metrics import curve, threshold_for_share

TABLE = load_model_table()


def test_apgr_of_random_is_half_and_of_an_oracle_more() -> None:
    rng = np.random.default_rng(0)
    weak = rng.random(400) < 0.6
    strong = weak | (rng.random(400) < 0.5)
    assert curve(np.zeros(400), weak, strong).apgr() == pytest.approx(0.5)  # ties: random
    oracle = strong.astype(float) - weak.astype(float)
    c = curve(oracle, weak, strong)
    assert c.apgr() > 0.85 and c.cpt(1.0) == pytest.approx(oracle.clip(0).mean())
    assert curve(-oracle, weak, strong).apgr() < 0.5


def test_threshold_for_share_sends_that_share() -> None:
    scores = np.linspace(-1, 1, 101)
    t = threshold_for_share(scores, 0.2)
    assert (scores >= t).mean() == pytest.approx(0.2, abs=0.01)


def test_the_shipped_weights_load_and_score_within_bounds() -> None:
    model = load_router_model()
    vector = np.ones(model.dim, dtype=np.float32) / np.sqrt(model.dim)
    for score in (model.score("What is 2 + 2?", vector), model.score("Hello", None)):
        assert -1.0 <= score <= 1.0
    card = RouterCard.load()
    assert -1.0 <= card.default_threshold <= 1.0 and card.weights_sha256 == model.sha256


def test_weights_the_card_does_not_pin_are_refused(tmp_path: object) -> None:
    card = dataclasses.replace(RouterCard.load(), weights_sha256="0" * 64)
    with pytest.raises(RouterModelError, match="sha256"):
        load_router_model(card=card)
    with pytest.raises(RouterModelError, match="format"):
        RouterModel.from_json('{"format": "pickle"}')


# (English, Chinese) of one question: the Chinese has no spaces, so mean_word_chars counted the
# whole sentence as one word, 23-72 standard deviations out, and every one went small.
PAIRS = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?",
        "娜塔莉亚四月份把发夹卖给了她的48个朋友，五月份卖出的发夹数量是四月份的一半。"  # noqa: RUF001
        "娜塔莉亚四月和五月一共卖了多少个发夹？",  # noqa: RUF001
    ),
    (
        "A train travels 120 km in 1.5 hours, then 200 km in 2.5 hours. What is its average "
        "speed for the whole journey in km per hour?",
        "一列火车1.5小时行驶120公里，然后2.5小时行驶200公里。"  # noqa: RUF001
        "整个旅程的平均速度是每小时多少公里？",  # noqa: RUF001
    ),
    (
        "Prove that the square root of 2 is irrational, and explain each step of the argument.",
        "证明2的平方根是无理数，并解释论证的每一步。",  # noqa: RUF001
    ),
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return load_minilm_embedder()


@pytest.mark.parametrize(("english", "chinese"), PAIRS)
def test_the_tier_of_unspaced_text_does_not_hang_on_spaces(
    embedder: MiniLMEmbedder, english: str, chinese: str
) -> None:
    """The same Chinese with a space between characters (the embedding hardly moves: BERT's
    tokenizer splits CJK characters anyway) goes to the tier the unspaced one goes to."""
    model, threshold = load_router_model(), RouterCard.load().default_threshold
    spaced = " ".join(chinese)
    en, zh, sp = embedder.embed([english, chinese, spaced])
    unspaced = model.score(chinese, zh)
    tiers = [unspaced >= threshold, model.score(spaced, sp) >= threshold]
    assert tiers[0] == tiers[1], f"unspaced large={tiers[0]}, spaced large={tiers[1]}"
    assert unspaced > 0.05 and model.score(english, en) > 0.05  # both heads not saturated


def test_shape_features_beyond_the_fit_range_are_clipped_to_it() -> None:
    model = load_router_model()
    word = SHAPE_FEATURES.index("mean_word_chars")
    raw = (shape_features("x" * 400)[word] - model.shape_mean[word]) / model.shape_scale[word]
    assert raw > model.shape_high[word] + 10  # one 400-char word: far beyond any fitted prompt
    shape = model.standardised("x" * 400)
    assert shape[word] == model.shape_high[word]
    assert np.all((model.shape_low <= shape) & (shape <= model.shape_high))
    expected = model.large_shape.probability(shape) - model.small_shape.probability(shape)
    assert model.score("x" * 400, None) == pytest.approx(expected)
    # what the fit tool writes: the fit half's range, so its prompts are never clipped
    from services.tools.evaluation.router.fitting import shape_bounds

    x = np.random.default_rng(0).normal(size=(50, len(SHAPE_FEATURES))).astype(np.float32)
    low, high = shape_bounds((x - x.mean(axis=0)) / x.std(axis=0))
    assert np.all(low < 0) and np.all(high > 0) and low.shape == (len(SHAPE_FEATURES),)


def test_weights_without_shape_bounds_are_refused() -> None:
    body = json.loads(load_router_model().to_json())
    del body["shape_bounds"]
    with pytest.raises(RouterModelError, match=r"shape_bounds.*make fit-router"):
        RouterModel.from_json(json.dumps(body))
    body["shape_bounds"] = {"low": [1.0] * len(SHAPE_FEATURES), "high": [0.0] * 8}
    with pytest.raises(RouterModelError, match="low <= high"):
        RouterModel.from_json(json.dumps(body))


def _costs(small_read: int, large_read: int, written: int = 0) -> tuple[object, object]:
    small, large = TABLE.for_tier("small"), TABLE.for_tier("large")
    prompt = 3000
    return (
        tier_cost(small, prompt - small_read - written, written, small_read, 100),
        tier_cost(large, prompt - large_read - written, written, large_read, 100),
    )


def test_cold_tiers_keep_the_calibrated_threshold() -> None:
    small, large = _costs(0, 0)
    decision = decide(0.2, 0.12, LOCAL, small, large)  # type: ignore[arg-type]
    assert decision.tier == "large" and decision.threshold == pytest.approx(0.12)
    assert decide(0.05, 0.12, NONE).tier == "small"


def test_a_warm_large_tier_keeps_the_conversation() -> None:
    small, large = _costs(0, 2900)
    decision = decide(0.05, 0.5, FROM_LOOKUP, small, large)  # type: ignore[arg-type]
    assert decision.tier == "large" and decision.threshold < 0.05
    assert "kept on the large tier" in decision.reason and "2900 tokens warm" in decision.reason


def test_a_warm_small_tier_needs_a_higher_score_to_leave() -> None:
    small, large = _costs(2900, 0)
    stays = decide(0.15, 0.12, FROM_LOOKUP, small, large)  # type: ignore[arg-type]
    assert stays.tier == "small" and stays.threshold > 0.15  # cold, 0.15 would go large
    assert "kept on the small tier" in stays.reason
    assert decide(0.3, -0.1, FROM_LOOKUP, small, large).tier == "large"  # type: ignore[arg-type]


class _Fixed:
    version = "test"
    dim = 3

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 3), dtype=np.float32)


def test_the_embedding_comes_from_the_lookup_or_says_where_else() -> None:
    from services.router.routing.router import TierRouter

    model = load_router_model()
    router = TierRouter(model, 0.1, TABLE, None, None, None)  # type: ignore[arg-type]
    vector = np.zeros(model.dim, dtype="<f4")
    lookup = sc.LookupResponse(embedding=vector.tobytes(), embedder_version=model.embedder)
    got, source = asyncio.run(router._embedding("a question", lookup))
    assert source == FROM_LOOKUP and got is not None and got.shape == (model.dim,)
    lookup.skip_reason = "semantic mode bypass skips the read"
    assert asyncio.run(router._embedding("a question", lookup))[1] == FROM_EMBED
    assert asyncio.run(router._embedding("a question", None)) == (None, NONE)
    fixed = LocalEmbedder(_Fixed)
    local = TierRouter(model, 0.1, TABLE, None, None, fixed)  # type: ignore[arg-type]
    assert asyncio.run(local._embedding("a question", None))[1] == LOCAL


@pytest.mark.parametrize(
    ("model", "threshold"), [("auto", 1.5), ("auto", float("nan")), ("sim-small", 0.2)]
)
def test_a_bad_request_threshold_is_refused_naming_the_field(model: str, threshold: float) -> None:
    request = pb.CompleteRequest(
        model=model,
        max_tokens=16,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="hi")])],
        routing=pb.RoutingOptions(threshold=threshold),
    )
    with pytest.raises(RequestError, match=r"routing\.threshold"):
        validate_request(request, TABLE, {"sim-small", "sim-large"})


def test_a_choices_indent_never_spans_lines() -> None:
    """`^\\s*` let the lettered-choice pattern start at every blank line and scan the whole run
    of whitespace after it: 10k newlines in a prompt held the router's event loop 8 s (1 MiB:
    days), for every tenant. The count of choices is unchanged."""
    assert _CHOICE.match("\n  b) yes") is None  # the indent of a line, not the lines before
    assert _CHOICE.match("  b) yes") is not None
    text = "Pick one:\n\n\n A) red\n\tB) blue\n(c) green\nD. none" + "\n" * 50_000 + "end"
    assert shape_features(text)[SHAPE_FEATURES.index("lettered_choices")] == 0.4


def test_a_long_question_is_scored_off_the_event_loop() -> None:
    """Its shape features are Python loops over the text (1 MB: ~0.25 s): on the event loop
    they would hold every tenant's calls; a short one stays inline (no thread hop)."""
    import threading

    from services.router.routing.router import _SCORE_INLINE_CHARS, TierRouter

    model = load_router_model()
    scored_on: list[int] = []

    class Recording:
        def score(self, text: str, embedding: object) -> float:
            scored_on.append(threading.get_ident())
            return model.score(text, None)

    router = TierRouter(Recording(), 0.1, TABLE, None, None, None)  # type: ignore[arg-type]

    def ask(text: str) -> None:
        request = pb.CompleteRequest(
            model="auto",
            max_tokens=16,
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        )

        async def run() -> int:
            await router.route("tenant-a", request, None)
            return threading.get_ident()

        loop_thread = asyncio.run(run())
        assert (scored_on[-1] == loop_thread) is (len(text) <= _SCORE_INLINE_CHARS)

    ask("What is 2 + 2?")
    ask("Summarise this log: " + "line of a log, 12 errors\n" * 2000)


def test_an_embedder_version_mismatch_is_logged_once_a_minute_not_once_a_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A semantic cache embedding with another model than the router was fitted on (a rolling
    upgrade) wrote a WARNING for every ``auto`` request: 1,000 requests, 1,000 lines."""
    from services.router.routing.router import TierRouter

    model = load_router_model()
    now = [0.0]
    no_calls: Any = None  # not reached: the embedding alone
    router = TierRouter(model, 0.1, TABLE, no_calls, no_calls, None, clock=lambda: now[0])
    vector = np.zeros(model.dim, dtype="<f4")
    lookup = sc.LookupResponse(embedding=vector.tobytes(), embedder_version="another@v2")
    with caplog.at_level(logging.WARNING, logger="cachemesh.router"):
        for _ in range(1_000):
            assert asyncio.run(router._embedding("a question", lookup)) == (None, NONE)
            now[0] += 0.01
        now[0] += 60
        asyncio.run(router._embedding("a question", lookup))
    lines = [r.getMessage() for r in caplog.records if "the router was fitted on" in r.getMessage()]
    assert len(lines) == 2 and "(999 more since the last such line" in lines[1]


def test_a_prefill_is_scored_on_the_question_it_follows() -> None:
    """A request ending in a prefill has no last user text: it was scored on "" (0.1509, over
    the calibrated threshold), so every ``auto`` prefill went to the large tier whatever its
    question. It is scored on the user message the prefill follows, with the router's own
    embedding of it (L1 embeds no question of a prefill), as the question alone is."""
    from services.router.routing.router import TierRouter

    model = load_router_model()
    scored: list[tuple[str, object]] = []

    class Recording:
        embedder = model.embedder

        def score(self, text: str, embedding: object) -> float:
            scored.append((text, embedding))
            return model.score(text, None)

    router = TierRouter(Recording(), 0.1, TABLE, None, None, LocalEmbedder(_Fixed))  # type: ignore[arg-type]

    def turn(role: pb.Role.ValueType, text: str) -> pb.Message:
        return pb.Message(role=role, content=[pb.ContentBlock(text=text)])

    question = turn(pb.ROLE_USER, "What is 2+2?")
    plain = pb.CompleteRequest(model="auto", max_tokens=16, messages=[question])
    prefill = pb.CompleteRequest(
        model="auto", max_tokens=16, messages=[question, turn(pb.ROLE_ASSISTANT, "Answer:")]
    )
    stale = sc.LookupResponse(
        embedding=np.zeros(3, dtype="<f4").tobytes(), embedder_version=model.embedder
    )
    plain_tier = asyncio.run(router.route("tenant-a", plain, None)).decision
    prefill_tier = asyncio.run(router.route("tenant-a", prefill, stale)).decision
    assert [text for text, _ in scored] == ["What is 2+2?", "What is 2+2?"]
    assert prefill_tier.tier == plain_tier.tier
    assert prefill_tier.embedding_source == LOCAL  # not the lookup's, which is of no question
