"""A self-hosted engine behind a provider adapter (llama-server, vLLM) reports its KV reuse only
at the end: the FINAL gives that report to prefix-cache's view of the replica, which scores
its prediction and, when the engine held less (a restart, traffic the view never saw), evicts
what an LRU engine lost with it, so Plan stops ranking a cold replica warm."""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.kv_blocks import BLOCK_SIZE
from services.common.metrics import new_registry
from services.common.models import load_model_table
from services.common.prompt import canonical_blocks, prompt_token_ids
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import BadRequest, PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.metrics import PrefixCacheMetrics
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import EngineReuse, ReplicaViews
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore

MODEL = "llama-3-1-8b-vllm"  # self_hosted rules
AGENT = " ".join(f"Step {i}: check the order status before answering." for i in range(60))
FAQ = " ".join(f"Topic {i}: opening hours, returns and shipping." for i in range(60))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _ask(system: str, question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        system=[pb.ContentBlock(text=system)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=64,
    )


class Rig:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.views = ReplicaViews(65536)
        self.registry = new_registry()
        self.clock = clock = ManualClock()
        self.core = PrefixCacheCore(
            plans=PlanMemo(clock, ttl_ms=60_000, max_blocks=1 << 20),
            table=load_model_table(),
            tokenizer=TokenizerSlot(tokenizer),
            cache=InMemoryWarmStore(),
            views=self.views,
            ledger=InMemoryLedger(CommitRecords(3_600_000), TotalsLedger()),
            clock=clock,
            lookback=20,
            metrics=PrefixCacheMetrics(self.registry),
        )

    async def turn(
        self,
        rid: str,
        system: str,
        question: str,
        replica: str,
        cached: int | None,
        tenant: str = "t",
    ) -> Split:
        """A call whose engine tells its reuse at the end only (``cached``; None: no usage,
        as a call cancelled before its end); returns what the WARM estimated."""
        request = _ask(system, question)
        warm = await self.core.warm(tenant, rid, MODEL, request, replica, kv_cached_unreported=True)
        usage = None
        if cached is not None:
            n = len(prompt_token_ids(canonical_blocks(request, self.tokenizer)))
            report = pc.OpenAIUsage(
                prompt_tokens=n,
                completion_tokens=10,
                total_tokens=n + 10,
                prompt_tokens_details=pc.OpenAIPromptTokensDetails(cached_tokens=cached),
            )
            usage = pc.ProviderUsage(openai=report)
        await self.core.final(tenant, rid, MODEL, 0 if usage else 10, 0, "", usage)
        return warm

    async def warmth(self, system: str, question: str, tenant: str = "t") -> dict[str, int]:
        plan = await self.core.plan(tenant, MODEL, _ask(system, question), ["a", "b"])
        return {c.replica: c.warm_prefix_tokens for c in plan.candidates}


async def test_a_restarted_engines_report_of_zero_clears_the_prefix_it_lost(
    tokenizer: Tokenizer,
) -> None:
    rig = Rig(tokenizer)
    await rig.turn("a1", AGENT, "Order 1?", "a", 0)
    await rig.turn("a2", AGENT, "Order 1?", "b", 0)
    await rig.turn("f1", FAQ, "Hours?", "a", 0)  # touched after the agent's prefix
    # replica a's engine restarts; its next FAQ call reused nothing
    estimated = await rig.turn("f2", FAQ, "Returns?", "a", 0)
    assert estimated.read_tokens > 0  # the view predicted the FAQ prefix
    assert rig.views.stats.reports == 4 and rig.views.stats.corrections == 1
    assert rig.views.stats.abs_error_tokens == estimated.read_tokens
    warmth = await rig.warmth(AGENT, "Order 2?")
    assert warmth["a"] == 0 and warmth["b"] > 0  # a lost the agent's prefix too (LRU)
    assert (await rig.warmth(FAQ, "Hours?"))["a"] > 0  # what f2 prefilled since is held
    labels = {"model": MODEL, "cause": "report"}
    corrections = "cachemesh_prefix_cache_view_corrections_total"
    blocks = "cachemesh_prefix_cache_view_evicted_blocks_total"
    assert rig.registry.get_sample_value(corrections, labels) == 1
    assert rig.registry.get_sample_value(blocks, labels) == rig.views.stats.corrected_blocks > 0


async def test_a_partial_reuse_evicts_what_was_touched_before_the_lost_block_only(
    tokenizer: Tokenizer,
) -> None:
    rig = Rig(tokenizer)
    await rig.turn("a1", AGENT, "Order 1, the long question about my refund?", "a", 0)
    await rig.turn("f1", FAQ, "Hours?", "a", 0)  # touched after the agent's prompt
    before = (await rig.warmth(AGENT, "Order 1, the long question about my refund?"))["a"]
    # the engine evicted the tail of the agent's prompt (the view's head 20 blocks reused)
    estimated = await rig.turn("a2", AGENT, "Order 2?", "a", 320)
    assert estimated.read_tokens > 320 and rig.views.stats.corrections == 1
    after = (await rig.warmth(AGENT, "Order 1, the long question about my refund?"))["a"]
    assert after < before  # the first turn's own tail (touched before the lost block) went
    assert after >= estimated.read_tokens  # the shared system prompt, prefilled again, stays
    assert (await rig.warmth(FAQ, "Hours?"))["a"] > 0  # touched later: kept


async def test_a_report_at_or_above_the_prediction_is_scored_and_evicts_nothing(
    tokenizer: Tokenizer,
) -> None:
    rig = Rig(tokenizer)
    await rig.turn("a1", AGENT, "Order 1?", "a", 0)
    estimated = await rig.turn("a2", AGENT, "Order 2?", "a", None)  # cancelled: no report
    assert rig.views.stats.reports == 1  # only a1's
    held = (await rig.warmth(AGENT, "Order 3?"))["a"]
    assert estimated.read_tokens == held > 0
    await rig.turn("a3", AGENT, "Order 3?", "a", held + 5)
    assert rig.views.stats.reports == 2 and rig.views.stats.corrections == 0
    assert rig.views.stats.abs_error_tokens == 5
    assert (await rig.warmth(AGENT, "Order 3?"))["a"] == held


def test_one_tenants_flood_of_notes_leaves_another_tenants_note_scored() -> None:
    """The notes awaiting a FINAL are bounded for all tenants together; over the bound the
    tenant holding the most loses its oldest, so tenant A's flood of self-hosted calls no
    longer pushes out tenant B's note (B's FINAL then scored nothing and corrected nothing)."""
    views = ReplicaViews(4096, awaited_blocks=100)
    ids = list(range(161))  # 10 reusable blocks of 16
    held = views.hashes("b", MODEL, ids)
    views.record("r1", held, len(ids), None)  # cached: its repeat is predicted 10 blocks
    views.record("r1", held, len(ids), None, ("b", "b-1"))
    for i in range(50):
        flood = views.hashes("a", MODEL, [1000 * (i + 1) + t for t in ids])
        views.record("r1", flood, len(ids), None)
        views.record("r1", flood, len(ids), None, ("a", f"a-{i}"))
    none = EngineReuse(0, len(ids))  # the engine reused none of it
    views.report(("b", "b-1"), none)
    assert views.stats.reports == 1
    assert views.stats.corrections == 1  # B's engine held none of it: the view was corrected
    views.report(("a", "a-0"), none)  # A's oldest went: over the bound, A held the most
    assert views.stats.reports == 1
    views.report(("a", "a-49"), none)
    assert views.stats.reports == 2


@pytest.mark.parametrize(
    ("engine_prompt", "reused", "corrected"),
    [
        (321, 304, True),  # one count (one tokenizer): exact, one block short is a loss
        (321, 320, False),
        (300, 288, False),  # counts fewer: every block it could reuse is a full reuse
        (300, 272, False),  # a block short of it: within the counts' difference and a block
        (300, 265, False),  # 283 of the view's 320, within 21 + 16 of them
        (300, 264, True),  # 282: short of the prediction by more than that
        (400, 384, False),  # counts more: every block it could reuse
        (400, 281, False),  # 225 of the view's, within 79 + 16
        (400, 280, True),  # 224
        (300, 0, True),  # a restart, whatever the counts
        (400, 0, True),
    ],
)
def test_a_report_in_the_engines_tokens_is_compared_in_the_views(
    engine_prompt: int, reused: int, corrected: bool
) -> None:
    """The engine counts its reuse in its own tokens and the view in cl100k's; a report is
    compared in the view's: a full reuse of the engine's prompt is the whole prompt, any other
    is scaled by the two counts, and is a loss only past their difference plus a block."""
    views = ReplicaViews(4096)
    ids = list(range(321))  # 20 reusable blocks of 16
    held = views.hashes("t", MODEL, ids)
    views.record("r1", held, len(ids), None)
    assert views.record("r1", held, len(ids), None, ("t", "1")) == 320
    views.report(("t", "1"), EngineReuse(reused, engine_prompt))
    assert views.stats.reports == 1 and views.stats.corrections == int(corrected)
    if engine_prompt != len(ids) and reused >= (engine_prompt - 1) // 16 * 16:
        assert views.stats.abs_error_tokens == 0  # a full reuse: the view's whole prompt


@pytest.mark.parametrize("planned", [True, False])
def test_blocks_the_view_learned_after_the_request_arrived_are_no_evidence_of_a_loss(
    planned: bool,
) -> None:
    """Two concurrent requests of one prefix: the engine prefilled them together (neither
    reused the other), the view recorded the twin first. The report of 0 says nothing of what
    the engine held before the request arrived (``mark`` at its Plan), so nothing is evicted;
    without the Plan's mark the view as it stands judges (and corrects)."""
    views = ReplicaViews(4096)
    ids = list(range(321))
    other = views.hashes("o", MODEL, ids)
    held = views.hashes("t", MODEL, ids)
    views.record("r1", other, len(ids), None)
    arrived = views.mark("r1")  # both requests' Plans
    views.record("r1", held, len(ids), None, ("t", "twin"))
    since = arrived if planned else None
    assert views.record("r1", held, len(ids), None, ("t", "2"), since) == 320
    views.report(("t", "2"), EngineReuse(0, len(ids)))
    assert views.stats.abs_error_tokens == 320  # scored all the same
    assert views.stats.corrections == (0 if planned else 1)
    assert views.match("r1", other, len(ids)) == (320 if planned else 0)


def test_a_report_at_the_first_token_corrects_the_view_as_one_at_the_final() -> None:
    """The simulator reports its reuse at the first token: a restarted replica's report of 0
    corrects the view at once, as a FINAL's report does."""
    views = ReplicaViews(4096)
    ids = list(range(321))
    other = views.hashes("o", MODEL, ids)
    held = views.hashes("t", MODEL, ids)
    views.record("r1", other, len(ids), EngineReuse(0, len(ids)))
    views.record("r1", held, len(ids), EngineReuse(0, len(ids)))  # touched after the other
    assert views.match("r1", other, len(ids)) == 320
    assert views.record("r1", held, len(ids), EngineReuse(0, len(ids))) == 320  # a restart
    assert views.stats.corrections == 1 and views.stats.corrected_blocks == 20
    assert views.match("r1", other, len(ids)) == 0  # lost with it (LRU)
    assert views.match("r1", held, len(ids)) == 320  # prefilled again: held
    assert views.stats.abs_error_tokens == 320


async def _stalled_then_answered(
    rig: Rig, rid: str, question: str, stalled: list[str], *, by_plan: bool = True
) -> None:
    """A request planned over replicas a and b, its call to ``stalled`` handed over as
    stalled before its first report, answered by b: the WARM names the stalled replicas (by
    the Plan's id, or with the request when ``by_plan`` is False: no Plan held)."""
    request = _ask(AGENT, question)
    plan = await rig.core.plan("t", MODEL, request, ["a", "b"])
    await rig.core.warm(
        "t",
        rid,
        MODEL,
        None if by_plan else request,
        "b",
        plan_id=plan.plan_id if by_plan else "",
        kv_cached_unreported=True,
        stalled_warm=stalled,
    )


async def test_a_call_stalled_where_the_plan_predicted_warm_clears_what_the_engine_lost(
    tokenizer: Tokenizer,
) -> None:
    """A restarted llama-server (its KV cache gone) predicted warm: the request's call there
    stalls in a cold prefill and is handed over, so it makes no commit and its engine's report
    never reaches the view. The WARM of the replica that answered names it: the view takes
    that as a report of the blocks a lost prefix must have taken for the call to stall gone
    there (before, it kept predicting the replica warm): with m of P tokens predicted warm,
    those from 2m - P on (a cold prefill of fewer held tokens overruns twice the warm one's)."""
    rig = Rig(tokenizer)
    await rig.turn("a1", AGENT, "Order 1?", "a", 0)
    await rig.turn("f1", FAQ, "Hours?", "a", 0)  # touched after the agent's prefix
    await rig.turn("x1", FAQ, "Hours?", "b", 0)
    plan = await rig.core.plan("t", MODEL, _ask(AGENT, "Order 2?"), ["a", "b"])
    predicted = {c.replica: c.warm_prefix_tokens for c in plan.candidates}["a"]
    assert predicted > plan.prompt.plan.prompt_tokens / 2  # a stall the router names
    await _stalled_then_answered(rig, "a2", "Order 2?", ["a"])
    assert rig.views.stats.stalls == 1 and rig.views.stats.corrections == 1
    kept = (2 * predicted - plan.prompt.plan.prompt_tokens) // BLOCK_SIZE * BLOCK_SIZE
    warmth = await rig.warmth(AGENT, "Order 3?")  # the same system prompt
    assert warmth["a"] == kept < predicted and warmth["b"] > 0  # a lost its tail, b took it
    assert (await rig.warmth(FAQ, "Hours?"))["a"] > 0  # touched after it: no evidence (LRU)
    evicted = rig.views.stats.corrected_blocks
    assert evicted > 0
    labels = {"model": MODEL, "cause": "stall"}
    corrections = "cachemesh_prefix_cache_view_corrections_total"
    blocks = "cachemesh_prefix_cache_view_evicted_blocks_total"
    assert rig.registry.get_sample_value(corrections, labels) == 1
    assert rig.registry.get_sample_value(blocks, labels) == evicted


async def test_a_stall_evicts_the_stalled_prompts_blocks_only_not_what_was_touched_before(
    tokenizer: Tokenizer,
) -> None:
    """A stall shows no more than that the call was slow there: a healthy but slow or shared
    engine stalls too. So the view loses the stalled prompt's own blocks (its conversation
    goes to the replica that took it over), not every block touched before them, as an
    engine's report of 0 would: before, tenant T's stall on replica a evicted tenant C's FAQ
    prefix there (82 blocks), and C's next turn was predicted, and billed, cold (656 -> 0)."""
    rig = Rig(tokenizer)
    await rig.turn("c1", FAQ, "Hours?", "a", None, tenant="C")
    await rig.turn("a1", AGENT, "Order 1?", "a", None)  # touched after C's prefix
    before = (await rig.warmth(FAQ, "Returns?", tenant="C"))["a"]
    agent = (await rig.warmth(AGENT, "Order 2?"))["a"]
    assert before > 0
    await _stalled_then_answered(rig, "a2", "Order 2?", ["a"])
    assert rig.views.stats.stalls == 1
    assert (await rig.warmth(AGENT, "Order 2?"))["a"] < agent  # its tail went
    assert (await rig.warmth(FAQ, "Returns?", tenant="C"))["a"] == before
    read = await rig.turn("c2", FAQ, "Returns?", "a", None, tenant="C")
    assert read.read_tokens == before  # billed as its own traffic warmed it


def test_a_stall_keeps_a_system_prompt_the_tenants_other_conversations_share() -> None:
    """A stall from a lost prefix means the engine held fewer than 2m - P of the prompt's P
    tokens (m predicted warm): only the blocks from there on are shown lost. Before, one
    stall of ten conversations sharing a 1,024-token system prompt, on a healthy but slow
    replica, evicted the whole prompt (89 blocks), and the other nine went from 1,408 tokens
    predicted warm there to 0 (billed cold: a self-hosted read is capped by the view)."""
    views = ReplicaViews(100_000)
    system = list(range(1000, 1000 + 1024))
    convs = [system + [50_000 + c * 1000 + i for i in range(400)] for c in range(10)]
    hashes = [views.hashes("T", MODEL, ids) for ids in convs]
    for ids, h in zip(convs, hashes, strict=True):
        views.record("a", h, len(ids), None)
    mark = views.mark("a")
    assert [views.match("a", h, 1424) for h in hashes] == [1408] * 10
    assert views.stalled("a", hashes[0], 1424, mark) == 2  # 2 * 1,408 - 1,424 = 1,392 on
    assert views.match("a", hashes[0], 1424) == 1392
    assert [views.match("a", h, 1424) for h in hashes[1:]] == [1408] * 9
    # its next stall there (the prediction 1,392: the engine held under 1,360) takes more
    assert views.stalled("a", hashes[0], 1424, views.mark("a")) == 2
    assert views.match("a", hashes[0], 1424) == 1360
    assert [views.match("a", h, 1424) for h in hashes[1:]] == [1408] * 9
    assert views.stats.stalls == 2 and views.stats.corrected_blocks == 4


async def test_a_stall_without_the_plan_held_or_on_a_replica_learned_since_evicts_nothing(
    tokenizer: Tokenizer,
) -> None:
    """Only the Plan's marks tell what the view held when the request arrived: without the
    Plan (expired, another process), or for a prefix the view learned after it (a concurrent
    request's WARM there), the stall is no evidence and nothing is evicted."""
    rig = Rig(tokenizer)
    await rig.turn("a1", AGENT, "Order 1?", "a", 0)
    await _stalled_then_answered(rig, "a2", "Order 2?", ["a"], by_plan=False)
    assert rig.views.stats.stalls == 0
    assert (await rig.warmth(AGENT, "Order 3?"))["a"] > 0

    other = Rig(tokenizer)
    plan = await other.core.plan("t", MODEL, _ask(AGENT, "Order 2?"), ["a", "b"])
    await other.turn("a1", AGENT, "Order 1?", "a", 0)  # after the Plan's mark
    await other.core.warm(
        "t",
        "a2",
        MODEL,
        None,
        "b",
        plan_id=plan.plan_id,
        kv_cached_unreported=True,
        stalled_warm=["a"],
    )
    assert other.views.stats.stalls == 0
    assert (await other.warmth(AGENT, "Order 3?"))["a"] > 0


@pytest.mark.parametrize("named", ["b", ""])
async def test_a_warm_naming_its_own_replica_or_an_empty_one_as_stalled_is_refused(
    tokenizer: Tokenizer, named: str
) -> None:
    rig = Rig(tokenizer)
    with pytest.raises(BadRequest, match="stalled_warm_replicas"):
        await _stalled_then_answered(rig, "a2", "Order 2?", [named])
