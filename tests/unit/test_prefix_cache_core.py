"""Plan, WARM, FINAL and Totals on real prompts (cl100k counts computed here, never guessed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.kv_blocks import BLOCK_SIZE, reusable_blocks
from services.common.models import load_model_table
from services.common.prompt import canonical_blocks, prompt_token_ids
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.commit_records import MIN_RECORD_TTL_MS, CommitRecords
from services.prefix_cache.core import (
    BadRequest,
    NoWarmCommit,
    PrefixCacheCore,
    TableLacksModel,
    TokenizerSlot,
)
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import RuleViolation, Split
from services.prefix_cache.totals import TenantTotals
from services.prefix_cache.warm import WarmStore
from tests.unit.conftest import LedgerFactory

TABLE = load_model_table()
LARGE = TABLE.models["sim-large"]
SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the policy section." for i in range(120))
CC = pb.CacheControl()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@dataclass
class Rig:
    core: PrefixCacheCore
    clock: ManualClock
    cache: WarmStore
    tokenizer: Tokenizer

    def tokens(self, request: pb.CompleteRequest, upto: int | None = None) -> int:
        blocks = canonical_blocks(request, self.tokenizer)
        return sum(b.tokens for b in blocks[: len(blocks) if upto is None else upto])

    def ids(self, request: pb.CompleteRequest) -> list[int]:
        return prompt_token_ids(canonical_blocks(request, self.tokenizer))

    async def entries(self) -> int:
        return await self.cache.count()


@pytest.fixture
def rig(tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory) -> Rig:
    clock, cache = ManualClock(), warm_store
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizer),
        cache=cache,
        views=ReplicaViews(65536),
        ledger=make_ledger(3_600_000),
        clock=clock,
        lookback=20,
    )
    return Rig(core, clock, cache, tokenizer)


def ask(question: str, tool_text: str = "Search the policy base.") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        tools=[pb.Tool(name="search", description=tool_text, input_schema_json="{}")],
        system=[pb.ContentBlock(text=SYSTEM, cache_control=CC)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=100,
    )


def split(input_: int = 0, w5: int = 0, w1: int = 0, read: int = 0) -> Split:
    return Split(input_tokens=input_, write_5m_tokens=w5, write_1h_tokens=w1, read_tokens=read)


async def test_first_turn_writes_then_the_same_prefix_is_read(rig: Rig) -> None:
    first, second = ask("What is rule 7?"), ask("And rule 8?")
    cached = rig.tokens(first, upto=2)  # tools + system, up to the breakpoint
    assert cached >= LARGE.min_cacheable_tokens
    got = await rig.core.warm("a", "r1", "sim-large", first, "")
    assert got == split(input_=rig.tokens(first) - cached, w5=cached)
    got = await rig.core.warm("a", "r2", "sim-large", second, "")
    assert got == split(input_=rig.tokens(second) - cached, read=cached)


async def test_a_prefix_warmed_after_a_request_arrived_is_not_read_by_it(rig: Rig) -> None:
    """Anthropic: "a cache entry only becomes available after the first response begins" and
    the cache is looked up when the request is processed, so two concurrent cold requests both
    write; the later one's first token must not turn into a read."""
    first, second = ask("What is rule 7?"), ask("And rule 8?")
    cached = rig.tokens(first, upto=2)
    arrival = await rig.core.plan("a", "sim-large", second, [])  # both arrive cold
    assert arrival.split.read_tokens == 0
    await rig.core.warm("a", "r1", "sim-large", first, "")  # the other one's first token
    got = await rig.core.warm(
        "a", "r2", "sim-large", second, "", max_read_tokens=arrival.split.read_tokens
    )
    assert got == split(input_=rig.tokens(second) - cached, w5=cached)
    later = await rig.core.warm("a", "r3", "sim-large", ask("Rule 9?"), "", max_read_tokens=cached)
    assert later.read_tokens == cached  # a request that arrived after the warm-up reads it


async def test_changing_the_tools_invalidates_everything_after_them(rig: Rig) -> None:
    await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    changed = ask("Q?", tool_text="Search the policy base and the FAQ.")
    got = await rig.core.warm("a", "r2", "sim-large", changed, "")
    assert got.read_tokens == 0 and got.write_5m_tokens == rig.tokens(changed, upto=2)


async def test_tenants_never_read_each_others_prefixes(rig: Rig) -> None:
    await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    assert (await rig.core.plan("b", "sim-large", ask("Q?"), [])).split.read_tokens == 0
    assert (await rig.core.warm("b", "r1", "sim-large", ask("Q?"), "")).read_tokens == 0


async def test_models_never_read_each_others_prefixes(rig: Rig) -> None:
    await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    assert (await rig.core.plan("a", "sim-small", ask("Q?"), [])).split.read_tokens == 0


async def test_plan_predicts_without_refreshing_or_writing(rig: Rig) -> None:
    request = ask("Q?")
    cached = rig.tokens(request, upto=2)
    for _ in range(2):  # Plan twice: still a write, nothing became warm
        plan = await rig.core.plan("a", "sim-large", request, [])
        assert plan.split == split(input_=rig.tokens(request) - cached, w5=cached)
    assert await rig.entries() == 0
    await rig.core.warm("a", "r1", "sim-large", request, "")
    rig.clock.advance(s=200)
    assert (await rig.core.plan("a", "sim-large", request, [])).split.read_tokens == cached
    rig.clock.advance(s=150)  # 350 s after the write: Plan did not refresh it
    assert (await rig.core.plan("a", "sim-large", request, [])).split.read_tokens == 0


async def test_plan_ranks_replicas_by_warm_prefix_ties_keep_order(rig: Rig) -> None:
    # vLLM's prefix caching: full blocks of 16 only, and the last token is always computed.
    first = ask("What is rule 7?")
    await rig.core.warm("a", "r1", "sim-large", first, "replica-2")
    plan = await rig.core.plan("a", "sim-large", first, ["replica-1", "replica-2", "replica-3"])
    assert [(c.replica, c.warm_prefix_tokens) for c in plan.candidates] == [
        ("replica-2", reusable_blocks(rig.tokens(first)) * BLOCK_SIZE),
        ("replica-1", 0),
        ("replica-3", 0),
    ]
    other = ask("Something else entirely?")  # shares tools + system (and a little more)
    a, b = rig.ids(first), rig.ids(other)
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    plan = await rig.core.plan("a", "sim-large", other, ["replica-1", "replica-2"])
    assert plan.candidates[0].warm_prefix_tokens == common // BLOCK_SIZE * BLOCK_SIZE
    assert common >= rig.tokens(other, upto=2)
    plan = await rig.core.plan("b", "sim-large", first, ["replica-1", "replica-2"])
    assert [c.warm_prefix_tokens for c in plan.candidates] == [0, 0]


async def test_repeated_warm_returns_the_recorded_split_and_changes_nothing(rig: Rig) -> None:
    first = await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    other = ask("Q?", tool_text="A different tool set.")
    again = await rig.core.warm("a", "r1", "sim-large", other, "replica-9")
    assert again == first
    assert (await rig.core.plan("a", "sim-large", other, [])).split.read_tokens == 0
    plan = await rig.core.plan("a", "sim-large", other, ["replica-9"])
    assert plan.candidates[0].warm_prefix_tokens == 0


async def test_a_repeated_warm_naming_another_model_is_refused(rig: Rig) -> None:
    """A retried WARM is the same call: one naming another model got the first one's split
    back without a word (the FINAL refuses the same mismatch), and its caller would bill its
    answer on a row it never ran."""
    first = await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    with pytest.raises(BadRequest, match="differs from 'sim-large' of the WARM commit"):
        await rig.core.warm("a", "r1", "sim-small", ask("Q?"), "")
    assert await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "") == first


async def test_final_bills_once_and_a_repeat_returns_the_same_cost(rig: Rig) -> None:
    request = ask("Q?")
    warm = await rig.core.warm("a", "r1", "sim-large", request, "")
    final = await rig.core.final("a", "r1", "sim-large", 40, 16, "")
    expected = (
        warm.input_tokens * 3000 + warm.write_5m_tokens * 3750 + 40 * 15000
    )  # sim-large prices
    assert final.charge.cost_nanos == expected
    assert final.charge.baseline_nanos == rig.tokens(request) * 3000 + 40 * 15000
    assert final.charge.saved_nanos < 0  # a write turn
    assert (final.output_tokens, final.kv_cached_tokens) == (40, 16)
    repeat = await rig.core.final("a", "r1", "sim-large", 999, 0, "sim-small")
    assert repeat == final
    assert await rig.core.totals("a") == TenantTotals(
        requests=1,
        input_tokens=warm.input_tokens,
        cache_creation_input_tokens=warm.write_5m_tokens,
        output_tokens=40,
        kv_cached_tokens=16,
        cost_nanos=expected,
        baseline_nanos=final.charge.baseline_nanos,
    )
    assert await rig.core.totals("b") == TenantTotals()


async def test_final_baseline_model_prices_the_baseline(rig: Rig) -> None:
    request = ask("Q?")
    request.model = "auto"
    await rig.core.warm("a", "r1", "sim-small", request, "")
    final = await rig.core.final("a", "r1", "sim-small", 10, 0, "sim-large")
    assert final.charge.baseline_nanos == rig.tokens(request) * 3000 + 10 * 15000


async def test_final_without_warm_is_a_failed_precondition(rig: Rig) -> None:
    with pytest.raises(NoWarmCommit, match="commit phase WARM"):
        await rig.core.final("a", "never", "sim-large", 1, 0, "")
    await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    with pytest.raises(NoWarmCommit):  # the WARM is the other tenant's
        await rig.core.final("b", "r1", "sim-large", 1, 0, "")


async def test_commit_records_expire_after_their_ttl(rig: Rig) -> None:
    await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    rig.clock.advance(s=3600)
    with pytest.raises(NoWarmCommit):
        await rig.core.final("a", "r1", "sim-large", 1, 0, "")


def test_commit_records_are_bounded() -> None:
    records = CommitRecords(ttl_ms=MIN_RECORD_TTL_MS, max_records=2)
    for rid in ("r1", "r2", "r3"):
        records.put_warm("a", rid, "sim-large", "", split(input_=1), 0)
    assert len(records) == 2 and records.get("a", "r1", 0) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"output_tokens": -1}, "output_tokens"),
        ({"kv_cached_tokens": -5}, "kv_cached_tokens"),
        # a bill past int64 nano-dollars: refused before anything is written
        ({"output_tokens": 10**15}, "output_tokens"),
        ({"provider_usage": pc.ProviderUsage(anthropic=pc.AnthropicUsage(
            input_tokens=10**15, output_tokens=5))}, "prompt tokens"),
        ({"provider_usage": pc.ProviderUsage(anthropic=pc.AnthropicUsage(
            input_tokens=10, output_tokens=10**15)), "output_tokens": 0}, "output tokens"),
        # a model this replica's table lacks: TableLacksModel (FAILED_PRECONDITION), below
        ({"baseline_model": "gpt-9"}, "baseline_model"),
        ({"baseline_model": "auto"}, "baseline_model 'auto'"),
        ({"model": "sim-small"}, "model"),
        ({"request_id": ""}, "request_id"),
        ({"tenant": ""}, "tenant"),
    ],
)  # fmt: skip
async def test_bad_final_changes_nothing(rig: Rig, kwargs: dict[str, object], field: str) -> None:
    await rig.core.warm("a", "r1", "sim-large", ask("Q?"), "")
    args: dict[str, object] = {
        "tenant": "a",
        "request_id": "r1",
        "model": "sim-large",
        "output_tokens": 5,
        "kv_cached_tokens": 0,
        "baseline_model": "",
    }
    kind = TableLacksModel if kwargs.get("baseline_model") == "gpt-9" else BadRequest
    with pytest.raises(kind, match=field):
        await rig.core.final(**{**args, **kwargs})  # type: ignore[arg-type]
    assert await rig.core.totals("a") == TenantTotals()
    assert (await rig.core.final("a", "r1", "sim-large", 5, 0, "")).output_tokens == 5


async def test_bad_warm_changes_nothing(rig: Rig) -> None:
    too_many = ask("Q?")
    too_many.messages[0].content.extend(
        pb.ContentBlock(text=f"p{i}", cache_control=CC) for i in range(4)
    )
    with pytest.raises(RuleViolation, match="at most 4"):
        await rig.core.warm("a", "r1", "sim-large", too_many, "replica-1")
    with pytest.raises(BadRequest, match=r"model 'auto'.*resolve"):
        await rig.core.warm("a", "r1", "auto", ask("Q?"), "replica-1")
    with pytest.raises(BadRequest, match="request is required"):
        await rig.core.warm("a", "r1", "sim-large", None, "replica-1")
    assert await rig.entries() == 0
    with pytest.raises(NoWarmCommit):
        await rig.core.final("a", "r1", "sim-large", 1, 0, "")


async def test_empty_text_breakpoint_names_the_field(rig: Rig) -> None:
    request = ask("Q?")
    request.messages[0].content.append(pb.ContentBlock(text="", cache_control=CC))
    with pytest.raises(RuleViolation, match=r"request\.messages\[0\]\.content\[1\]"):
        await rig.core.plan("a", "sim-large", request, [])


async def test_a_replica_reporting_a_loss_at_its_first_token_stops_ranking_warm(rig: Rig) -> None:
    """A replica that reports its reuse at the first token (the simulator) and was restarted
    reports 0: the view is corrected then, not only on a FINAL's report. Before, Plan kept
    ranking R1 warm with 1,440 tokens of p2 (corrections 0)."""
    p1, p2 = (
        pb.CompleteRequest(
            model="sim-large",
            system=[pb.ContentBlock(text=f"Manual {n}. {SYSTEM}")],
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Go on.")])],
            max_tokens=20,
        )
        for n in ("one", "two")
    )
    await rig.core.warm("a", "1", "sim-large", p2, "R1", kv_cached_tokens=0)
    await rig.core.warm("a", "2", "sim-large", p1, "R1", kv_cached_tokens=0)  # touched after p2
    # R1 restarts: p1 again, the replica reports it reused nothing
    await rig.core.warm("a", "3", "sim-large", p1, "R1", kv_cached_tokens=0)
    plan = await rig.core.plan("a", "sim-large", p2, ["R1", "R2"])
    assert [(c.replica, c.warm_prefix_tokens) for c in plan.candidates] == [("R1", 0), ("R2", 0)]
    plan = await rig.core.plan("a", "sim-large", p1, ["R2", "R1"])
    assert plan.candidates[0].replica == "R1" and plan.candidates[0].warm_prefix_tokens > 0


async def test_two_concurrent_requests_reported_at_the_first_token_keep_the_view(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """Two concurrent requests of one prefix on R1: the replica prefilled A (nothing cached),
    then B (all of it), but B's WARM reached prefix-cache first. A's report of 0 is no sign of
    a loss: the view learned those blocks (B's) after A arrived. Tenant C's prefix stays."""
    c, p = (
        pb.CompleteRequest(
            model="sim-large",
            system=[pb.ContentBlock(text=f"{head} {SYSTEM}")],
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Go on.")])],
            max_tokens=20,
        )
        for head in ("Tenant C's manual.", "The agent's prompt.")
    )
    clock = ManualClock()
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizer),
        cache=warm_store,
        views=ReplicaViews(65536),
        ledger=make_ledger(3_600_000),
        clock=clock,
        lookback=20,
        plans=PlanMemo(clock, ttl_ms=60_000, max_blocks=1 << 20),  # the WARMs take their Plans
    )
    await core.warm("c", "c1", "sim-large", c, "R1", kv_cached_tokens=0)
    held = (await core.plan("c", "sim-large", c, ["R1"])).candidates[0].warm_prefix_tokens
    plans = {rid: await core.plan("a", "sim-large", p, ["R1"]) for rid in ("A", "B")}
    full = (len(prompt_token_ids(canonical_blocks(p, tokenizer))) - 1) // 16 * 16
    for rid, reused in (("B", full), ("A", 0)):
        await core.warm("a", rid, "sim-large", None, "R1", reused, plan_id=plans[rid].plan_id)
    plan = await core.plan("c", "sim-large", c, ["R2", "R1"])
    assert [(x.replica, x.warm_prefix_tokens) for x in plan.candidates] == [("R1", held), ("R2", 0)]
