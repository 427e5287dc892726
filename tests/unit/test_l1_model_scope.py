"""L1 serves an answer only for the model and the sampling that made it (DESIGN.md, "What a
cache hit may serve"), across an operator's change of the model table.

The router's L1 calls (``Calls``, as the pipeline makes them) reach a real ``SemanticCacheApi``
in process. An answer is stored by a router on one table, then looked up by a router on the
table an operator changed (a restart after editing ``CACHEMESH_MODELS_FILE`` or
``CACHEMESH_AUTO_SMALL``). Before ``model_facts`` the scope held the requested string alone:
every old answer was served for the new model (5 of 5 questions each, below), and an explicit
``temperature`` 1.0 to a llama-server row was served the answers its engine sampled at its own
default (0.8) for requests without one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.models import ModelTable, load_model_table
from services.router.calls import Calls
from services.router.dependencies import Dependencies
from services.router.model_facts import ModelScopes, accepted_models, model_facts
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.query import scope_of
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
from tests.unit.test_router_pipeline import (
    REPLICAS,
    FakeModels,
    FakePrefix,
    Rig,
    _cached,
    _request,
    _settings,
)

TABLE = load_model_table()
QUESTIONS = (
    "how do i reset my password",
    "where is my invoice",
    "what is the capital of france",
    "how do i cancel my plan",
    "which ports does the stack use",
)


@dataclass
class InProcess:
    """The router's semantic-cache port, answered by a real L1 in this process."""

    api: SemanticCacheApi

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        return await self.api.lookup(request, deadline_s)

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        return await self.api.store(request)

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        return await self.api.release(request)

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        return await self.api.renew(request)


def l1() -> InProcess:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    return InProcess(SemanticCacheApi(cache))


def router(semantic: InProcess, table: ModelTable) -> Calls:
    return Calls(
        Dependencies(semantic, FakePrefix(), FakeModels(), REPLICAS),
        _settings(),
        models=ModelScopes(table),
    )


def answer(table: ModelTable, model: str) -> sc.CachedAnswer:
    row = table.get(model)
    assert row is not None
    return sc.CachedAnswer(
        content=[pb.ContentBlock(text=f"{row.id} ({row.upstream}) says so.")],
        model=row.id,
        tier=row.tier,
        stop_reason="end_turn",
        output_tokens=5,
    )


async def served_after(
    before: ModelTable,
    after: ModelTable,
    model: str,
    answered_by: str,
    asked: float | None = None,
    stored: float | None = None,
) -> int:
    """Of ``QUESTIONS`` answered by ``answered_by`` under ``before`` (requests for ``model``,
    temperature ``stored``), how many L1 serves under ``after`` (temperature ``asked``)."""
    semantic = l1()
    first, second = router(semantic, before), router(semantic, after)
    for question in QUESTIONS:
        request = make_request(question, model=model, temperature=stored)
        looked = await first.lookup("tenant-a", request)
        assert looked is not None and not looked.hit
        reply = await first.store("tenant-a", request, answer(before, answered_by), looked.lease_id)
        assert reply is not None and reply.stored, reply
    served = 0
    for question in QUESTIONS:
        request = make_request(question, model=model, temperature=asked)
        looked = await second.lookup("tenant-a", request)
        assert looked is not None
        served += looked.hit
    return served


def repointed(model: str, upstream_id: str) -> ModelTable:
    row = TABLE.get(model)
    assert row is not None
    models = {**TABLE.models, model: row.model_copy(update={"upstream_id": upstream_id})}
    return ModelTable(models=models, auto=TABLE.auto)


async def test_a_row_repointed_to_another_upstream_model_serves_none_of_the_old_answers() -> None:
    """claude-3-5-haiku's upstream_id repointed from claude-3-5-haiku-latest to
    claude-haiku-4-5: the old model's answers were served for the new one (5 of 5); none now.
    The unchanged table still serves them all."""
    after = repointed("claude-3-5-haiku", "claude-haiku-4-5")
    assert await served_after(TABLE, after, "claude-3-5-haiku", "claude-3-5-haiku") == 0
    assert await served_after(TABLE, TABLE, "claude-3-5-haiku", "claude-3-5-haiku") == 5


async def test_a_row_given_an_upstream_id_serves_none_of_the_answers_of_its_own_id() -> None:
    """sim-small called by its id, then by another name (its upstream_id set): a new scope."""
    after = repointed("sim-small", "sim-small-v2")
    assert await served_after(TABLE, after, "sim-small", "sim-small") == 0


async def test_auto_with_a_tier_repointed_serves_none_of_the_old_rows_answers() -> None:
    """auto.small repointed from sim-small to claude-haiku-4-5 (CACHEMESH_AUTO_SMALL): the
    sim-small answers were served to auto (5 of 5); none now, each a miss refused "model: ...".
    auto's own answers of the rows it still resolves to keep their scope and are served."""
    after = ModelTable(models=TABLE.models, auto={**TABLE.auto, "small": "claude-haiku-4-5"})
    assert await served_after(TABLE, after, "auto", "sim-small") == 0
    assert await served_after(TABLE, after, "auto", "sim-large") == 5
    assert await served_after(TABLE, TABLE, "auto", "sim-small") == 5


async def test_the_refusal_of_a_repointed_tiers_answer_names_the_rows() -> None:
    after = ModelTable(models=TABLE.models, auto={**TABLE.auto, "small": "claude-haiku-4-5"})
    semantic = l1()
    request = make_request(QUESTIONS[0], model="auto")
    looked = await router(semantic, TABLE).lookup("tenant-a", request)
    assert looked is not None
    await router(semantic, TABLE).store(
        "tenant-a", request, answer(TABLE, "sim-small"), looked.lease_id
    )
    refused = await router(semantic, after).lookup("tenant-a", request)
    assert refused is not None and not refused.hit
    assert refused.refusal == (
        "model: the cached answer is sim-small's; the request's model resolves to "
        "claude-haiku-4-5, sim-large now"
    )


async def test_an_explicit_temperature_1_to_an_engine_is_not_served_its_default_samples() -> None:
    """local-small (llama-server, sent no temperature when unset: it samples at its own 0.8):
    an explicit 1.0 was served the answers made without one (5 of 5); none now. Unset for unset
    is served, as is an explicit 1.0 for an explicit 1.0, and on the simulator (whose unset is
    1.0) an explicit 1.0 still shares the unset one's answers."""
    assert await served_after(TABLE, TABLE, "local-small", "local-small", asked=1.0) == 0
    assert await served_after(TABLE, TABLE, "local-small", "local-small", stored=1.0) == 0
    assert await served_after(TABLE, TABLE, "local-small", "local-small") == 5
    assert await served_after(TABLE, TABLE, "local-small", "local-small", 1.0, 1.0) == 5
    assert await served_after(TABLE, TABLE, "sim-small", "sim-small", asked=1.0) == 5


async def test_an_engine_rows_unset_temperature_is_not_served_an_explicit_1s_old_answers() -> None:
    """A router from before ``ModelFacts`` (no table: the scope of the requested string alone)
    stored local-small's answers to an explicit 1.0 in the scope an unset temperature shared
    with it. After the upgrade they were served to requests without one (5 of 5), which
    llama-server samples at its own 0.8; none now, and none to an explicit 1.0 either (that
    old scope mixes both samplings: neither reads it again)."""
    semantic = l1()
    before = Calls(Dependencies(semantic, FakePrefix(), FakeModels(), REPLICAS), _settings())
    for question in QUESTIONS:
        request = make_request(question, model="local-small", temperature=1.0)
        looked = await before.lookup("tenant-a", request)
        assert looked is not None and not looked.hit
        reply = await before.store(
            "tenant-a", request, answer(TABLE, "local-small"), looked.lease_id
        )
        assert reply is not None and reply.stored, reply
    after = router(semantic, TABLE)
    served = {None: 0, 1.0: 0}
    for question in QUESTIONS:
        for temperature in served:
            request = make_request(question, model="local-small", temperature=temperature)
            looked = await after.lookup("tenant-a", request)
            assert looked is not None
            served[temperature] += looked.hit
    assert served == {None: 0, 1.0: 0}


def test_every_scope_whose_meaning_did_not_change_is_the_one_it_was() -> None:
    """The packaged table's facts leave the scope of each row called by its own id, of auto
    (sim-small and sim-large), and of an engine row's explicit temperature other than 1.0 as
    they were: their entries are served after the upgrade. Rows called by another upstream
    name (gpt-4-1 is gpt-4.1) get a new scope once, as do an engine row's unset temperature
    and explicit 1.0 (the scope they shared holds answers of both samplings)."""
    for model, temperature in (
        ("sim-small", None),
        ("sim-large", 1.0),
        ("auto", None),
        ("local-small", 0.7),
        ("claude-haiku-4-5", 0.5),
    ):
        request = make_request(model=model, temperature=temperature)
        assert scope_of("a", request, model_facts(TABLE, request)) == scope_of("a", request)
    for model, temperature in (
        ("gpt-4-1", None),
        ("claude-3-5-haiku", None),
        ("local-small", None),
        ("local-small", 1.0),
    ):
        request = make_request(model=model, temperature=temperature)
        assert scope_of("a", request, model_facts(TABLE, request)) != scope_of("a", request)


async def test_an_l1_that_ignores_accepted_models_has_its_hit_refused_by_the_router() -> None:
    """An L1 older than ``accepted_models`` (or rolled back to one) returns sim-small's answer
    to auto after auto.small was repointed: the router refuses it, the model answers (with the
    new row) and its answer is stored over the old one."""
    stale = _cached("small")
    stale.model = "sim-small-old"  # auto.small's row before the repoint
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=stale)
    end = (await rig.run(_request("auto")))[-1].end
    assert [list(lookup.accepted_models) for lookup in rig.semantic.lookups] == [
        ["sim-small", "sim-large"]
    ]
    assert end.served_by != pb.LAYER_SEMANTIC_CACHE and end.model in ("sim-small", "sim-large")
    assert len(rig.semantic.stores) == 1
    # the current row's answer is served as before
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=_cached("small"))
    end = (await rig.run(_request("auto")))[-1].end
    assert end.served_by == pb.LAYER_SEMANTIC_CACHE and end.model == "sim-small"


def test_the_scopes_computed_once_are_those_of_each_request() -> None:
    """``ModelScopes`` holds, for every model string of a table (its rows and auto, on the
    packaged table and on one with a tier and a row repointed), what ``model_facts`` and
    ``accepted_models`` make of a request for it; a string the table does not have has
    neither. A request built with its facts holds a copy: changing it leaves the map alone."""
    changed = repointed("sim-small", "sim-small-v2")
    changed = ModelTable(models=changed.models, auto={**changed.auto, "small": "local-small"})
    for table in (TABLE, changed):
        scopes = ModelScopes(table)
        for model in (*table.models, "auto", "no-such-model"):
            request = make_request(model=model)
            assert scopes.facts(model) == model_facts(table, request), model
            assert list(scopes.accepted_models(model)) == accepted_models(table, request), model
    scopes = ModelScopes(changed)
    assert scopes.accepted_models("auto") == ("local-small", "sim-large")
    facts = scopes.facts("auto")
    assert facts is not None and facts.engine_default_temperature
    assert list(facts.upstreams) == []
    call = sc.LookupRequest(model_facts=facts)
    call.model_facts.upstreams.append("sim-large=other")
    call.model_facts.engine_default_temperature = False
    assert scopes.facts("auto") == sc.ModelFacts(engine_default_temperature=True)
    assert scopes.facts("sim-small") == sc.ModelFacts(upstreams=["sim-small=sim-small-v2"])
    assert scopes.facts("no-such-model") is None
