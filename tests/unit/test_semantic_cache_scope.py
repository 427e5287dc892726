"""SemanticCache: what a hit may serve (scope), the exact path, skips and thresholds."""

from __future__ import annotations

import math

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache import query as query_module
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.query import (
    RecentQueries,
    folded,
    normalise,
    query_from_request,
    scope_of,
)
from services.semantic_cache.records import Answer, InvalidQuery
from tests.unit.semantic_cache_support import FakeEmbedder, assistant, make_request, user

ANSWER = Answer(payload=b"answer", stop_reason="end_turn", output_tokens=40, has_tool_use=False)
QUESTION = "how do i reset my password"


def new_cache(threshold: float = 0.8) -> tuple[SemanticCache, FakeEmbedder]:
    embedder = FakeEmbedder()
    return SemanticCache(embedder, ManualClock(), threshold=threshold), embedder


async def put(cache: SemanticCache, request: pb.CompleteRequest, tenant: str = "a") -> None:
    result = await cache.store(query_from_request(tenant, request), ANSWER)
    assert result.stored, result.skip_reason


async def test_exact_hit_is_served_without_embedding() -> None:
    cache, embedder = new_cache()
    await put(cache, make_request(QUESTION))
    calls = embedder.calls
    result = await cache.check(
        query_from_request("a", make_request("  How do I   reset my password "))
    )
    assert result.hit and result.exact
    assert result.similarity == 1.0 and result.best_similarity == 1.0
    assert result.entry is not None and result.entry.answer == ANSWER
    assert embedder.calls == calls


async def test_paraphrase_above_threshold_hits_and_reports_similarity() -> None:
    cache, _ = new_cache(threshold=0.8)
    await put(cache, make_request(QUESTION))
    result = await cache.check(query_from_request("a", make_request(QUESTION + " please")))
    assert result.hit and not result.exact
    assert 0.8 <= result.similarity < 1.0
    assert result.best_similarity == result.similarity
    far = await cache.check(query_from_request("a", make_request("what are your opening hours")))
    assert not far.hit and far.skip_reason == ""
    assert 0.0 <= far.best_similarity < 0.8


OTHER_SCOPES = {
    "tenant": ("b", make_request()),
    "namespace": ("a", make_request(namespace="docs")),
    "system prompt": ("a", make_request(system="You are a pirate.")),
    "model": ("a", make_request(model="auto")),
    "temperature": ("a", make_request(temperature=0.0)),
    "earlier turns": ("a", make_request(history=(user("hi"), assistant("hello")))),
    "tools": ("a", make_request(tools=(pb.Tool(name="search"),))),
}


@pytest.mark.parametrize("what", sorted(OTHER_SCOPES))
async def test_an_entry_is_never_served_across_scopes(what: str) -> None:
    cache, _ = new_cache()
    await put(cache, make_request(QUESTION))
    tenant, request = OTHER_SCOPES[what]
    result = await cache.check(query_from_request(tenant, request))
    assert not result.hit
    # and the original scope still hits: the miss is about scope, not the entry
    assert (await cache.check(query_from_request("a", make_request(QUESTION)))).hit


async def test_scope_ignores_cache_control_max_tokens_request_id_and_default_temperature() -> None:
    cache, _ = new_cache()
    await put(cache, make_request(QUESTION, cache_system=True, max_tokens=100))
    request = make_request(QUESTION, temperature=1.0, max_tokens=900)
    request.request_id = "retry-1"
    assert (await cache.check(query_from_request("a", request))).hit


def test_scope_is_a_deterministic_sha256() -> None:
    first = scope_of("a", make_request(QUESTION))
    assert first == scope_of("a", make_request("another question entirely"))
    # pinned: a snapshot written by one process is read by the next, on any machine; a scope
    # computed differently would orphan every stored entry (as each SCOPE_VERSION does, on
    # purpose: v2, the last turn's blocks in their places; v3, the exact key's indentation)
    assert first == "28cea15307aa27cb19313f567e8d9cab3584c8512c827de9f86b8d7654b70fe2"
    assert first != scope_of("a", make_request(QUESTION, temperature=0.7))
    assert normalise("  Hello \r\n  \t WORLD ") == "Hello \n\t WORLD"
    assert folded("  Hello \r\n\t WORLD ") == "hello world"


async def test_prefill_and_textless_turns_are_skipped() -> None:
    cache, embedder = new_cache()
    prefill = make_request(QUESTION)
    prefill.messages.append(assistant("Sure, "))
    result = await cache.check(query_from_request("a", prefill))
    assert not result.hit and "not a user turn" in result.skip_reason
    blank = make_request("   ")
    assert (await cache.check(query_from_request("a", blank))).skip_reason
    assert not (await cache.store(query_from_request("a", prefill), ANSWER)).stored
    assert embedder.calls == 0


@pytest.mark.parametrize("mode", [pb.SEMANTIC_MODE_BYPASS, pb.SEMANTIC_MODE_REFRESH])
async def test_bypass_and_refresh_skip_the_read(mode: pb.SemanticMode.ValueType) -> None:
    cache, _ = new_cache()
    await put(cache, make_request(QUESTION))
    result = await cache.check(query_from_request("a", make_request(QUESTION, mode=mode)))
    assert not result.hit and "skips the read" in result.skip_reason


async def test_no_store_reads_but_never_stores() -> None:
    cache, _ = new_cache()
    await put(cache, make_request(QUESTION))
    no_store = make_request(QUESTION, mode=pb.SEMANTIC_MODE_NO_STORE)
    assert (await cache.check(query_from_request("a", no_store))).hit
    other = make_request("a new question", mode=pb.SEMANTIC_MODE_NO_STORE)
    result = await cache.store(query_from_request("a", other), ANSWER)
    assert not result.stored and "never stores" in result.skip_reason
    assert len(cache) == 1


async def test_bypass_never_stores_nor_replaces_an_entry() -> None:
    cache, _ = new_cache()
    await put(cache, make_request(QUESTION))
    for question in ("a new question", QUESTION):
        bypass = make_request(question, mode=pb.SEMANTIC_MODE_BYPASS)
        other = Answer(b"bypassed", "end_turn", 40, False)
        result = await cache.store(query_from_request("a", bypass), other)
        assert not result.stored and "never stores" in result.skip_reason
    assert len(cache) == 1
    assert not (await cache.check(query_from_request("a", make_request("a new question")))).hit
    kept = await cache.check(query_from_request("a", make_request(QUESTION)))
    assert kept.entry is not None and kept.entry.answer.payload == ANSWER.payload


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf])
async def test_a_threshold_outside_0_1_is_invalid_and_names_the_field(bad: float) -> None:
    cache, _ = new_cache()
    with pytest.raises(InvalidQuery) as caught:
        await cache.check(query_from_request("a", make_request(QUESTION, threshold=bad)))
    assert caught.value.field == "cache.threshold"


async def test_the_request_threshold_overrides_the_configured_one() -> None:
    cache, _ = new_cache(threshold=0.8)
    await put(cache, make_request(QUESTION))
    close = QUESTION + " please"
    assert not (await cache.check(query_from_request("a", make_request(close, threshold=0.99)))).hit
    middling = "how do i change my email"  # 4 of 6 words shared: cosine 0.67
    assert not (await cache.check(query_from_request("a", make_request(middling)))).hit
    loose = make_request(middling, threshold=0.5)
    assert (await cache.check(query_from_request("a", loose))).hit


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_the_configured_threshold_is_validated(bad: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        SemanticCache(FakeEmbedder(), ManualClock(), threshold=bad)


async def test_an_empty_tenant_is_invalid() -> None:
    cache, _ = new_cache()
    with pytest.raises(InvalidQuery):
        await cache.check(query_from_request("", make_request(QUESTION)))
    with pytest.raises(InvalidQuery):
        await cache.drop("")


@pytest.fixture
def derived(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tenants ``query_from_request`` derived a query for, in order."""
    tenants: list[str] = []
    real = query_module.query_from_request

    def counting(
        tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None = None
    ) -> query_module.Query:
        tenants.append(tenant)
        return real(tenant, request, facts)

    monkeypatch.setattr(query_module, "query_from_request", counting)
    return tenants


def test_recent_queries_reuse_a_query_only_for_the_same_tenant_and_bytes(
    derived: list[str],
) -> None:
    real = query_from_request
    recent = RecentQueries(size=2)
    request = make_request(QUESTION, system="S" * 20_000)
    first = recent.of("a", request)
    assert recent.of("a", make_request(QUESTION, system="S" * 20_000)) is first  # a Store
    assert derived == ["a"]
    assert first == real("a", request)
    other_tenant = recent.of("b", request)
    assert other_tenant.scope != first.scope  # never another tenant's query
    changed = make_request(QUESTION, system="S" * 20_000, max_tokens=7)
    assert recent.of("a", changed).max_tokens == 7  # any changed field is another key
    assert derived == ["a", "b", "a"] and len(recent) == 2  # the oldest went
    recent.of("a", request)
    assert derived == ["a", "b", "a", "a"]
    with pytest.raises(ValueError, match="size must be >= 0"):
        RecentQueries(size=-1)
    assert RecentQueries(size=0).of("a", request) == first  # 0: nothing remembered


def test_a_repeat_under_a_new_request_id_reuses_the_query_with_its_own_id(
    derived: list[str],
) -> None:
    """An exact hit is a repeat of a request under a new request_id (each call has its own):
    its query is the kept one but for the id, which names the lease; nothing is derived again.
    The request itself is left as it came."""
    real = query_from_request
    recent = RecentQueries(size=8)
    first_call = make_request(QUESTION, system="S" * 2_000)
    first_call.request_id = "call-1"
    first = recent.of("a", first_call)
    repeat = make_request(QUESTION, system="S" * 2_000)
    repeat.request_id = "call-2"
    again = recent.of("a", repeat)
    assert derived == ["a"]  # the repeat derived nothing
    assert again == real("a", repeat) and again.request_id == "call-2"
    assert first.request_id == "call-1" and recent.of("a", first_call) is first
    assert repeat.request_id == "call-2"  # its id is back
    assert recent.of("b", repeat).scope != first.scope and derived == ["a", "b"]
    changed = make_request(QUESTION, system="S" * 2_000, max_tokens=7)
    changed.request_id = "call-2"
    assert recent.of("a", changed).max_tokens == 7  # any other field is another key
    assert derived == ["a", "b", "a"]


def test_another_tenants_flood_of_requests_keeps_this_ones_query(derived: list[str]) -> None:
    """The bound is for all tenants together, shared fairly: tenant a's 100 distinct requests
    between b's Lookup and its Store push out a's own queries, not b's."""
    recent = RecentQueries(size=8)
    mine = recent.of("b", make_request(QUESTION))
    for i in range(100):
        recent.of("a", make_request(f"flood question {i}"))
    assert len(recent) == 8
    assert recent.of("b", make_request(QUESTION)) is mine  # b's Store: not derived again
    assert derived.count("b") == 1


def test_recent_queries_never_hold_a_large_question(derived: list[str]) -> None:
    recent = RecentQueries(size=8)
    large = make_request("x " * query_module.RECENT_QUERY_BYTES)
    assert recent.of("a", large) == recent.of("a", large) == query_from_request("a", large)
    assert derived == ["a", "a"] and len(recent) == 0  # derived each time, never kept
    document = make_request(QUESTION, system="D" * 200_000)  # a large request, short question
    recent.of("a", document)
    recent.of("a", document)
    assert derived == ["a", "a", "a"] and len(recent) == 1


async def test_the_folded_key_folds_case_but_keeps_sharp_s() -> None:
    """casefold() made "Maße" (measurements) the exact key of "Masse" (mass): served as an
    exact hit, no verifier asked."""
    assert folded("MASSE") == folded("Masse") == "masse"  # case folding is intended
    cache, _ = new_cache()
    await put(cache, make_request("Was bedeutet das Wort Maße?"))
    asked = await cache.check(query_from_request("a", make_request("Was bedeutet das Wort Masse?")))
    assert not asked.exact
    same = await cache.check(query_from_request("a", make_request("was bedeutet das wort maße?")))
    assert same.exact


def _with_last_turn(*blocks: pb.ContentBlock) -> pb.CompleteRequest:
    request = make_request(history=(user("compute 6*7"), assistant("calling the tool")))
    del request.messages[-1]
    request.messages.add(role=pb.ROLE_USER, content=blocks)
    return request


def _result(content: str = "42") -> pb.ContentBlock:
    return pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="u1", content=content))


def _text(value: str) -> pb.ContentBlock:
    return pb.ContentBlock(text=value)


ASKED_AS = (_result(), _text("Is that right?"))
LAST_TURN_MOVED = {  # what was stored, then the question asked again with its blocks moved
    "text before the result": (ASKED_AS, (_text("Is that right?"), _result())),
    "text moved past the result": (
        (_text("Check:"), _result(), _text("Is that right?")),
        (_text("Check:"), _text("Is that right?"), _result()),
    ),
    "another result": (ASKED_AS, (_result("43"), _text("Is that right?"))),
}


@pytest.mark.parametrize("what", sorted(LAST_TURN_MOVED))
async def test_the_last_turns_blocks_keep_their_places_in_the_scope(what: str) -> None:
    """Scope v1 held the last turn's non-text blocks without their places among its text:
    [tool_result, "Is that right?"] was served to ["Is that right?", tool_result], whose
    model reads another prompt (and Anthropic refuses: a tool_result must come first)."""
    cache, _ = new_cache()
    stored, asked = LAST_TURN_MOVED[what]
    await put(cache, _with_last_turn(*stored))
    assert not (await cache.check(query_from_request("a", _with_last_turn(*asked)))).hit
    assert (await cache.check(query_from_request("a", _with_last_turn(*stored)))).exact


async def test_a_run_of_text_blocks_is_one_text_in_the_scope() -> None:
    """Two text blocks after a result read as the one text they join into: still a hit."""
    cache, _ = new_cache()
    await put(cache, _with_last_turn(_result(), _text("Check this."), _text("Is that right?")))
    joined = _with_last_turn(_result(), _text("Check this.\nIs that right?"))
    result = await cache.check(query_from_request("a", joined))
    assert result.hit and result.exact
