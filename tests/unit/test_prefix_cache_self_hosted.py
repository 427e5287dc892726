"""A self-hosted model billed end to end through PrefixCacheCore (Plan, WARM with the engine's
``kv_cached_tokens``, FINAL, Totals), on both backends.

The documented rule (vLLM automatic prefix caching,
https://docs.vllm.ai/en/latest/design/prefix_caching.html): the replica's KV cache is the
cache; a prefix is reused in full blocks of 16 and the prompt's last token is always computed.
The replica's report is the truth of the read, up to what the tenant's own traffic left
there (the engine's cache is shared by every tenant; the view is salted per tenant). Prices
of ``llama-3-1-8b-vllm`` in the table: input 100 and output 100 nanos per token, a KV-reused
token 0 (it skips prefill); there is no write premium. Token counts are cl100k's, computed
here.
"""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.kv_blocks import reusable_blocks
from services.common.metrics import new_registry
from services.common.models import load_model_table
from services.common.prompt import canonical_blocks, prompt_token_ids
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.commit_records import Final
from services.prefix_cache.core import BadRequest, PrefixCacheCore, TokenizerSlot
from services.prefix_cache.metrics import PrefixCacheMetrics
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TenantTotals
from services.prefix_cache.warm import WarmStore
from tests.unit.conftest import LedgerFactory

TABLE = load_model_table()
MODEL = "llama-3-1-8b-vllm"
SYSTEM = " ".join(f"Step {i}: check the order status before answering." for i in range(60))
INPUT_NANOS, OUTPUT_NANOS, KV_READ_NANOS = 100, 100, 0


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def ask(question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        system=[pb.ContentBlock(text=SYSTEM)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=64,
    )


def test_the_table_row_is_self_hosted_with_the_prices_used_here() -> None:
    spec = TABLE.models[MODEL]
    assert spec.rules == "self_hosted" and spec.kv_block_tokens == 16
    assert (spec.input_nanos, spec.output_nanos, spec.cache_read_nanos) == (
        INPUT_NANOS,
        OUTPUT_NANOS,
        KV_READ_NANOS,
    )


def _core(
    tokenizer: Tokenizer,
    warm_store: WarmStore,
    make_ledger: LedgerFactory,
    views: ReplicaViews,
    metrics: PrefixCacheMetrics | None = None,
    *,
    keep_plans: bool = False,
) -> PrefixCacheCore:
    """The core these tests bill through: records kept an hour, a look-back of 20 blocks
    (``keep_plans``: its Plans kept a minute for their WARMs, as the service does)."""
    clock = ManualClock()
    return PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizer),
        cache=warm_store,
        views=views,
        ledger=make_ledger(3_600_000),
        clock=clock,
        lookback=20,
        plans=PlanMemo(clock, ttl_ms=60_000, max_blocks=1 << 20) if keep_plans else None,
        metrics=metrics,
    )


async def test_a_self_hosted_model_billed_end_to_end(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    core = _core(tokenizer, warm_store, make_ledger, ReplicaViews(65536))
    first, second = ask("Where is order 1?"), ask("Where is order 2?")
    ids1 = prompt_token_ids(canonical_blocks(first, tokenizer))
    ids2 = prompt_token_ids(canonical_blocks(second, tokenizer))
    p1, p2 = len(ids1), len(ids2)
    common = next(i for i, (x, y) in enumerate(zip(ids1, ids2, strict=False)) if x != y)
    assert common > 16 * 20  # the system prompt is shared: many full blocks

    # turn 1: cold replica, the engine reports 0 reused tokens
    assert await core.warm("t", "r1", MODEL, first, "replica-a", kv_cached_tokens=0) == Split(
        p1, 0, 0, 0
    )
    one = await core.final("t", "r1", MODEL, 40, 0, "")
    assert one.charge.cost_nanos == p1 * 100 + 40 * 100
    assert one.charge.baseline_nanos == p1 * 100 + 40 * 100 and one.charge.saved_nanos == 0

    # turn 2: Plan ranks replica-a first with the shared full blocks (16 tokens each)
    reusable = common // 16 * 16
    plan = await core.plan("t", MODEL, second, ["replica-b", "replica-a"])
    assert [(c.replica, c.warm_prefix_tokens) for c in plan.candidates] == [
        ("replica-a", reusable),
        ("replica-b", 0),
    ]
    assert plan.split == Split(p2 - reusable, 0, 0, reusable)
    # the engine's report is the truth: it reused 16 tokens fewer than predicted
    engine = reusable - 16
    warm = await core.warm("t", "r2", MODEL, second, "replica-a", kv_cached_tokens=engine)
    assert warm == Split(p2 - engine, 0, 0, engine)  # no write premium: the rest is input
    two = await core.final("t", "r2", MODEL, 25, engine, "")
    assert two.charge.cost_nanos == (p2 - engine) * 100 + engine * 0 + 25 * 100
    assert two.charge.baseline_nanos == p2 * 100 + 25 * 100
    assert two.charge.saved_nanos == engine * 100
    assert two.kv_cached_tokens == engine  # Usage.kv_cached_tokens of the response

    assert await core.totals("t") == TenantTotals(
        requests=2,
        input_tokens=p1 + p2 - engine,
        cache_read_input_tokens=engine,
        output_tokens=65,
        kv_cached_tokens=engine,
        cost_nanos=(p1 + p2 - engine) * 100 + 65 * 100,
        baseline_nanos=(p1 + p2) * 100 + 65 * 100,
    )


async def test_a_self_hosted_report_beyond_the_prompt_is_refused_and_records_nothing(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    core = _core(tokenizer, warm_store, make_ledger, ReplicaViews(65536))
    request = ask("Where is order 3?")
    prompt = len(prompt_token_ids(canonical_blocks(request, tokenizer)))
    with pytest.raises(BadRequest, match="kv_cached_tokens"):  # the last token is computed
        await core.warm("t", "r1", MODEL, request, "replica-a", kv_cached_tokens=prompt)
    assert await core.totals("t") == TenantTotals()
    plan = await core.plan("t", MODEL, request, ["replica-a"])
    assert plan.candidates[0].warm_prefix_tokens == 0  # the view was not touched


async def test_an_adapter_replicas_read_is_estimated_from_the_view_and_reconciled(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """A self-hosted engine behind the OpenAI adapter (llama-server, vLLM) reports its KV
    reuse only in the usage at the end: at WARM the estimated read is what the view says the
    chosen replica holds (not 0), and the engine's ``cached_tokens`` reconciles it at FINAL
    (its prompt count; its read up to the view's prediction)."""
    views = ReplicaViews(65536)
    core = _core(tokenizer, warm_store, make_ledger, views)
    first, second = ask("Where is order 1?"), ask("Where is order 2?")
    ids1 = prompt_token_ids(canonical_blocks(first, tokenizer))
    ids2 = prompt_token_ids(canonical_blocks(second, tokenizer))
    p2 = len(ids2)
    common = next(i for i, (x, y) in enumerate(zip(ids1, ids2, strict=False)) if x != y)
    reusable = common // 16 * 16

    cold = await core.warm("t", "r1", MODEL, first, "replica-a", kv_cached_unreported=True)
    assert cold.read_tokens == 0  # nothing of it on replica-a yet
    await core.final("t", "r1", MODEL, 0, 0, "", _openai_usage(len(ids1), 0, 40))

    # the next turn on replica-a: the view predicts the shared blocks are read
    warm = await core.warm("t", "r2", MODEL, second, "replica-a", kv_cached_unreported=True)
    assert warm == Split(p2 - reusable, 0, 0, reusable)
    # ... while on replica-b, which never saw the prompt, none would be
    other = await core.warm("t", "r3", MODEL, second, "replica-b", kv_cached_unreported=True)
    assert other.read_tokens == 0
    # the engine reports 8 more cached tokens than the view predicted (its own tokenizer, or
    # another tenant's prompt on the shared engine: not told apart): its prompt count is the
    # bill, its read at most the view's prediction, the 8 billed as input
    two = await core.final("t", "r2", MODEL, 0, 0, "", _openai_usage(p2, reusable + 8, 25))
    assert two.reconciled and two.split == Split(p2 - reusable, 0, 0, reusable)
    assert two.estimate.read_tokens == reusable
    # scored at FINAL with the engine's report (r1 and r2; r3 has none yet), never as a 0 at
    # the first token, which told nothing
    assert views.stats.reports == 2 and views.stats.abs_error_tokens == 8


def _openai_usage(prompt: int, cached: int, completion: int) -> pc.ProviderUsage:
    return pc.ProviderUsage(
        openai=pc.OpenAIUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=pc.OpenAIPromptTokensDetails(cached_tokens=cached),
        )
    )


async def test_a_tenant_is_billed_only_the_kv_reuse_its_own_traffic_left(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """The engine's KV cache is shared by every tenant (llama-server, vLLM without a cache
    salt): tenant A's prompt makes the engine reuse it for tenant B's identical one. B is
    billed, and told in its usage, only the reuse B's own traffic accounts for (its own,
    tenant-salted view of the replica): paying A's read would let B's bill and usage tell
    whether anyone sent a given prompt. The view is still scored with the engine's truth, and
    the reuse left unbilled is counted by model, naming no tenant."""
    views = ReplicaViews(65536)
    registry = new_registry()
    core = _core(tokenizer, warm_store, make_ledger, views, PrefixCacheMetrics(registry))
    memo = ask("Summarise the memo in one word.")
    prompt = len(prompt_token_ids(canonical_blocks(memo, tokenizer)))
    reusable = (prompt - 1) // 16 * 16
    full = prompt * INPUT_NANOS + 4 * OUTPUT_NANOS

    # tenant A sends it first: the engine reuses nothing
    await core.warm("a", "r1", MODEL, memo, "replica-a", kv_cached_unreported=True)
    a = await core.final("a", "r1", MODEL, 0, 0, "", _openai_usage(prompt, 0, 4))
    assert a.charge.cost_nanos == full

    # tenant B sends the same prompt to the same replica: the engine reuses A's prefix ...
    warm = await core.warm("b", "r1", MODEL, memo, "replica-a", kv_cached_unreported=True)
    assert warm.read_tokens == 0
    b = await core.final("b", "r1", MODEL, 0, reusable, "", _openai_usage(prompt, reusable, 4))
    # ... which B is neither billed as a read nor told of
    assert b.reconciled and b.split == Split(prompt, 0, 0, 0), b.split
    assert b.charge.cost_nanos == full and b.kv_cached_tokens == 0
    assert (await core.totals("b")).cache_read_input_tokens == 0
    # the view's error is still measured against the engine's report
    assert views.stats.reports == 2 and views.stats.abs_error_tokens == reusable

    # an engine that reports its reuse at the first token: the same rule
    split = await core.warm("c", "r1", MODEL, memo, "replica-a", kv_cached_tokens=reusable)
    assert split == Split(prompt, 0, 0, 0)
    c = await core.final("c", "r1", MODEL, 4, reusable, "")
    assert c.charge.cost_nanos == full and c.kv_cached_tokens == 0

    # B's own second request: its own traffic accounts for the reuse, which B is billed
    again = await core.warm("b", "r2", MODEL, memo, "replica-a", kv_cached_unreported=True)
    assert again.read_tokens == reusable
    b2 = await core.final("b", "r2", MODEL, 0, reusable, "", _openai_usage(prompt, reusable, 4))
    assert b2.split == Split(prompt - reusable, 0, 0, reusable)
    assert b2.kv_cached_tokens == reusable
    unattributed = "cachemesh_prefix_cache_kv_unattributed_tokens_total"
    assert registry.get_sample_value(unattributed, {"model": MODEL}) == 2 * reusable


AGENT = " ".join(f"Step {i}: check the ledger twice before you post it." for i in range(240))


async def _engine_turn(
    core: PrefixCacheCore,
    tokenizer: Tokenizer,
    tenant: str,
    request_id: str,
    request: pb.CompleteRequest,
    ratio: float,
    *,
    repeat: bool,
) -> tuple[int, Final]:
    """One call to an engine behind the OpenAI adapter whose tokenizer counts the prompt
    ``ratio`` times cl100k's count; a ``repeat`` is reused in full (every block it can reuse,
    in its own tokens). Returns the engine's prompt count and the FINAL's bill."""
    await core.warm(tenant, request_id, MODEL, request, "replica-a", kv_cached_unreported=True)
    engine = round(len(prompt_token_ids(canonical_blocks(request, tokenizer))) * ratio)
    cached = reusable_blocks(engine) * 16 if repeat else 0
    usage = _openai_usage(engine, cached, 5)  # its reuse in kv_cached_tokens too, as the router
    final = await core.final(tenant, request_id, MODEL, 0, cached, "", usage)
    return engine, final


@pytest.mark.parametrize("ratio", [0.99, 0.95, 0.815, 1.2])
async def test_an_engine_counting_otherwise_than_cl100k_leaves_other_tenants_reads_billed(
    ratio: float, tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """The engine reports its reuse and its prompt in its own tokens; the view counts cl100k's.
    A large-vocabulary engine counts German 0.815 and Chinese 0.743 of cl100k: a full reuse
    then looked like a loss, and the view evicted every block of the replica touched before
    it, other tenants' too, whose next reads (at most the view's) were billed as input. Tenant
    A's repeats (two a turn) and tenant B's (one) are reused in full by the engine: before the
    fix B's turns 2-6 at ratio 0.99 were billed 333,500 nanos instead of 5,500 (read 0 of 3,280
    tokens; 0.815: 275,000 instead of 3,000) and the view made 11 corrections evicting 205
    blocks. Now none is made, and B reads what it reused."""
    views = ReplicaViews(65536)
    core = _core(tokenizer, warm_store, make_ledger, views)
    agent, memo = ask_with(AGENT, "Post the ledger."), ask("Where is order 1?")
    own = reusable_blocks(len(prompt_token_ids(canonical_blocks(memo, tokenizer)))) * 16
    reads, costs = [], []
    for turn in range(6):
        for call in range(2):
            await _engine_turn(
                core, tokenizer, "a", f"a{turn}-{call}", agent, ratio, repeat=turn + call > 0
            )
        engine, b = await _engine_turn(
            core, tokenizer, "b", f"b{turn}", memo, ratio, repeat=turn > 0
        )
        if turn:
            reads.append(b.split.read_tokens)
            costs.append(b.charge.cost_nanos)
    # the engine's read in its tokens: all of it, B's own prediction being its whole prompt
    read = reusable_blocks(engine) * 16
    assert reads == [read] * 5, (ratio, reads, sum(costs), views.stats)  # the figures above
    assert costs == [(engine - read) * INPUT_NANOS + 5 * OUTPUT_NANOS] * 5
    assert views.stats.corrections == 0 and views.stats.corrected_blocks == 0
    plan = await core.plan("b", MODEL, memo, ["replica-b", "replica-a"])
    first = plan.candidates[0]
    assert (first.replica, first.warm_prefix_tokens) == ("replica-a", own)


@pytest.mark.parametrize("ratio", [0.815, 1.2])
async def test_an_engine_counting_otherwise_that_lost_its_cache_still_corrects_the_view(
    ratio: float, tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """A restarted engine's report of 0 corrects the view whatever its count of the prompt:
    Plan stops ranking the cold replica warm for what it lost (the other tenant's prefix,
    touched before)."""
    views = ReplicaViews(65536)
    core = _core(tokenizer, warm_store, make_ledger, views)
    agent, memo = ask_with(AGENT, "Post the ledger."), ask("Where is order 1?")
    await _engine_turn(core, tokenizer, "b", "b0", memo, ratio, repeat=False)
    await _engine_turn(core, tokenizer, "a", "a0", agent, ratio, repeat=False)
    # the engine restarts: A's repeat reuses nothing
    await _engine_turn(core, tokenizer, "a", "a1", agent, ratio, repeat=False)
    assert views.stats.corrections == 1 and views.stats.corrected_blocks > 0
    plan = await core.plan("b", MODEL, memo, ["replica-a"])
    assert plan.candidates[0].warm_prefix_tokens == 0


def ask_with(system: str, question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        system=[pb.ContentBlock(text=system)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=64,
    )


async def test_two_concurrent_calls_of_one_prefix_leave_other_tenants_reads_billed(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """Tenant A sends one prompt twice at once; the engine prefills both together (vLLM's
    batch: neither reuses the other), but the second's WARM finds the first's blocks in the
    view. Its report of 0 is no sign of a loss: the view learned those blocks after the call
    arrived (its Plan), when the engine may not have held them yet. Before, the view took it
    for one and evicted every block of the replica touched before, tenant C's too, whose next
    read was billed as input (67,400 nanos instead of 1,800)."""
    views = ReplicaViews(65536)
    core = _core(tokenizer, warm_store, make_ledger, views, keep_plans=True)
    agent, memo = ask_with(AGENT, "Post the ledger."), ask("Where is order 1?")
    await _engine_turn(core, tokenizer, "c", "c0", memo, 1.0, repeat=False)
    # both arrive (their Plans) before either's first token
    plans = {rid: await core.plan("a", MODEL, agent, ["replica-a"]) for rid in ("a1", "a2")}
    n = len(prompt_token_ids(canonical_blocks(agent, tokenizer)))
    for rid, plan in plans.items():
        await core.warm(
            "a", rid, MODEL, None, "replica-a", plan_id=plan.plan_id, kv_cached_unreported=True
        )
    for rid in ("a1", "a2"):
        await core.final("a", rid, MODEL, 0, 0, "", _openai_usage(n, 0, 5))
    engine, c = await _engine_turn(core, tokenizer, "c", "c1", memo, 1.0, repeat=True)
    own = reusable_blocks(engine) * 16
    assert c.split.read_tokens == own, (c.charge.cost_nanos, views.stats)
    assert c.charge.cost_nanos == (engine - own) * INPUT_NANOS + 5 * OUTPUT_NANOS
    assert views.stats.corrections == 0


@pytest.mark.parametrize("ratio", [1.15, 1.2, 1.28])
async def test_an_engine_counting_more_than_cl100k_bills_a_tenants_own_repeat_read_in_full(
    ratio: float, tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """The engine reports its reuse and its prompt in its own tokens; the WARM's read (the
    tenant's own view) counts cl100k's. An engine counting more (SmolLM2: 15-28% more) reuses
    the whole of the tenant's own repeat: before, its read was capped at the WARM's cl100k
    count, the rest billed as input (ratio 1.2: B's five repeats 76,000 nanos instead of
    4,000, read 656 of the 800 tokens the engine reused; 1.15: 59,000 instead of 3,000; 1.28:
    102,500 instead of 6,500). Now the cap is in the engine's tokens, and a WARM that read
    every full block of the prompt (the tenant's own prompt, whole) lets the engine's reuse of
    every full block of its count through, none of it counted as unattributed."""
    views = ReplicaViews(65536)
    registry = new_registry()
    core = _core(tokenizer, warm_store, make_ledger, views, PrefixCacheMetrics(registry))
    memo = ask("Where is order 1?")
    reads, told, costs = [], [], []
    for turn in range(6):
        engine, b = await _engine_turn(
            core, tokenizer, "b", f"b{turn}", memo, ratio, repeat=turn > 0
        )
        if turn:
            reads.append(b.split.read_tokens)
            told.append(b.kv_cached_tokens)
            costs.append(b.charge.cost_nanos)
    reused = reusable_blocks(engine) * 16  # the engine's whole reuse, in its tokens
    assert reads == [reused] * 5, (ratio, reads, sum(costs))
    assert told == [reused] * 5
    assert costs == [(engine - reused) * INPUT_NANOS + 5 * OUTPUT_NANOS] * 5, sum(costs)
    totals = await core.totals("b")
    assert totals.cache_read_input_tokens == totals.kv_cached_tokens == 5 * reused
    unattributed = "cachemesh_prefix_cache_kv_unattributed_tokens_total"
    assert registry.get_sample_value(unattributed, {"model": MODEL}) == 0


LONG_QUESTION = " ".join(
    f"Question {i}: is the parcel for customer {i} late, and by how many days?" for i in range(45)
)


@pytest.mark.parametrize("ratio", [0.743, 0.815, 0.9, 1.0, 1.2])
async def test_an_engine_counting_otherwise_bills_and_tells_only_the_tenants_own_prefix(
    ratio: float, tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """Tenant A sends a long prompt; tenant B's own traffic left only its system prompt (a
    shorter prefix of it) on the replica. B then sends A's prompt: the engine reuses all of it
    (A's), in its own tokens. B is billed and told only its own part, in the engine's tokens,
    within one block rounded toward less. Before, the cap was B's cl100k count (656): an
    engine counting fewer tokens let B's read reach past its own prefix into A's reuse (0.815:
    read 656 where B's own part is 534.6 engine tokens, 121 of A's tokens billed as B's read
    and told in B's kv_cached_tokens; 0.743: 656 for 487.4), and one counting more billed B's
    own part short (1.2: 656 for 787.2). Now 534, 487 and 786."""
    views = ReplicaViews(65536)
    core = _core(tokenizer, warm_store, make_ledger, views)
    mine, theirs = ask("Where is order 1?"), ask(LONG_QUESTION)
    ids_mine = prompt_token_ids(canonical_blocks(mine, tokenizer))
    ids_theirs = prompt_token_ids(canonical_blocks(theirs, tokenizer))
    n = len(ids_theirs)
    common = next(i for i, (x, y) in enumerate(zip(ids_mine, ids_theirs, strict=False)) if x != y)
    own = common // 16 * 16  # B's own blocks of A's prompt, in cl100k's tokens
    engine = int(n * ratio)  # the engine's count of A's prompt (text counted evenly)
    assert reusable_blocks(engine) * 16 > own  # the engine's reuse reaches past B's prefix

    await _engine_turn(core, tokenizer, "b", "b0", mine, ratio, repeat=False)
    await _engine_turn(core, tokenizer, "a", "a0", theirs, ratio, repeat=False)
    warm = await core.warm("b", "b1", MODEL, theirs, "replica-a", kv_cached_unreported=True)
    assert warm.read_tokens == own
    cached = reusable_blocks(engine) * 16  # all of A's prompt, reused
    b = await core.final("b", "b1", MODEL, 0, cached, "", _openai_usage(engine, cached, 5))
    own_engine = own * ratio  # B's own part, in the engine's tokens
    assert own_engine - 16 <= b.split.read_tokens <= own_engine, (ratio, b.split, own_engine)
    assert b.kv_cached_tokens == b.split.read_tokens
    assert b.split.prompt_tokens == engine
    assert (await core.totals("b")).kv_cached_tokens == b.split.read_tokens
