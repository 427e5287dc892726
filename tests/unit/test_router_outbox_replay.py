"""An answer whose WARM commit prefix-cache did not take (a timeout while it was slow) has its
FINAL refused (no WARM) and both go to the billing outbox: the replayed WARM prices the prompt
with the read its Plan predicted on arrival, as the lost WARM would have, so a prefix warm then
is billed as a read (0.1x), not as a write (1.25x / 2x), and the bill is the one the call would
have had. A prefix warmed only after the arrival is still not read. The replay keeps the
arrival's figures however late it runs: after an outage longer than the prefix's 5 minutes, or
after prefix-cache restarted with its warm state in memory, the read is still the read it was,
and the replay warms nothing the provider's cache no longer holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, Prompt, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from services.router.dependencies import CallFailed
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeModels, FakeStream, Rig

SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the policy section." for i in range(120))
TENANT = "tenant-a"  # the Rig's


def _ask(question: str, request_id: str) -> pb.CompleteRequest:
    cached = pb.CacheControl(ttl=pb.CACHE_TTL_5M)
    return pb.CompleteRequest(
        model="sim-large",
        request_id=request_id,
        max_tokens=50,
        system=[pb.ContentBlock(text=SYSTEM, cache_control=cached)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
    )


def _core(clock: ManualClock | None = None) -> tuple[PrefixCacheCore, ManualClock]:
    clock = clock if clock is not None else ManualClock()
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(TOKENIZER),
        cache=InMemoryWarmStore(),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(3_600_000), TotalsLedger()),
        clock=clock,
        lookback=20,
        plans=PlanMemo[Prompt](clock, ttl_ms=600_000, max_blocks=10**6),
    )
    return core, clock


class CorePort:
    """prefix-cache's API as the router's port; when ``slow`` its first WARM times out (after
    ``meanwhile``, which may commit another request as a concurrent one would)."""

    def __init__(
        self,
        api: PrefixCacheApi,
        slow: bool,
        meanwhile: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.api, self.meanwhile, self.failed = api, meanwhile, not slow

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return await self.api.plan(request)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_WARM and not self.failed:
            self.failed = True
            if self.meanwhile is not None:
                await self.meanwhile()
            raise CallFailed(Code.DEADLINE_EXCEEDED, "prefix-cache slow for one call")
        try:
            return await self.api.commit(request)
        except RequestError as exc:
            raise CallFailed(exc.code, exc.message) from exc


class Engine(FakeModels):
    """Replicas that count the prompt as prefix-cache does."""

    def __init__(self, prompt_tokens: int) -> None:
        super().__init__()
        self.prompt_tokens = prompt_tokens

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=self.prompt_tokens)
        end = model_pb2.GenerateEnd(output_tokens=3, stop_reason="end_turn")
        return FakeStream(
            [
                model_pb2.GenerateChunk(start=start),
                model_pb2.GenerateChunk(text="Cite section 2."),
                model_pb2.GenerateChunk(end=end),
            ]
        )


async def _turn(
    tmp: Path,
    *,
    slow: bool,
    warm_earlier: bool = True,
    outage_s: float = 0.0,
    restart: bool = False,
) -> tuple[dict[str, int], pb.CompleteResponse]:
    """A turn on the system prompt (warm from a turn a minute before when ``warm_earlier``,
    else warmed by a concurrent turn while this one's WARM is lost), its WARM lost once when
    ``slow``, the outbox flushed ``outage_s`` after the answer (by a prefix-cache started
    afresh, its warm state and totals in memory lost, when ``restart``); returns what the
    tenant's totals grew by and the answer."""
    core, clock = _core()
    if warm_earlier:
        await core.warm(TENANT, "earlier", "sim-large", _ask("Rule 1?", "earlier"), "")
        await core.final(TENANT, "earlier", "sim-large", 3, 0, "")
    clock.advance(s=60)
    before = await core.totals(TENANT)

    async def concurrent_turn() -> None:  # warms the prefix after this turn's arrival
        await core.warm(TENANT, "twin", "sim-large", _ask("Rule 3?", "twin"), "")

    prefix = CorePort(PrefixCacheApi(core), slow, None if warm_earlier else concurrent_turn)
    prompt = (await core.plan(TENANT, "sim-large", _ask("And rule 2?", ""), [])).split
    outbox = BillingOutbox(prefix, Journal(tmp), 1.0, 0.01)
    models = Engine(prompt.prompt_tokens)
    rig = Rig(prefix=prefix, outbox=outbox, models=models, wall=clock)  # type: ignore[arg-type]
    end = (await rig.run(_ask("And rule 2?", "r-next")))[-1].end
    assert end.cost.estimated == slow
    clock.advance(s=outage_s)
    if restart:
        core, _ = _core(clock)
        prefix.api = PrefixCacheApi(core)
        before = await core.totals(TENANT)
    assert await outbox.flush() == int(slow) and outbox.pending == 0
    after = await core.totals(TENANT)
    grown = {f: getattr(after, f) - getattr(before, f) for f in ("requests", *_FIELDS)}
    assert grown["requests"] == 1
    return grown, end


_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost_nanos")


async def test_a_lost_warm_commit_bills_the_warm_prefix_as_the_read_it_was(
    tmp_path: Path,
) -> None:
    acknowledged, _ = await _turn(tmp_path / "ok", slow=False)
    replayed, shown = await _turn(tmp_path / "slow", slow=True)
    assert acknowledged["cache_read_input_tokens"] > 1000  # the system prompt, read
    assert acknowledged["cache_creation_input_tokens"] == 0
    assert replayed == acknowledged, "the outbox replay billed the warm prefix as a write"
    # the answer's estimate claimed no discount: the bill is no more than it showed
    assert replayed["cost_nanos"] <= shown.cost.cost_nanos


async def test_a_prefix_warmed_after_the_arrival_is_not_read_by_the_replay(
    tmp_path: Path,
) -> None:
    replayed, _ = await _turn(tmp_path, slow=True, warm_earlier=False)
    assert replayed["cache_read_input_tokens"] == 0  # cold when the provider looked it up
    assert replayed["cache_creation_input_tokens"] > 1000


async def test_a_replay_after_the_prefix_expired_bills_the_read_it_was(tmp_path: Path) -> None:
    """The replay judged the prefix when it ran, 6 minutes after the arrival: expired, so a
    read of 2,414 tokens was billed as a 5-minute write (9x the cost). It bills the read."""
    acknowledged, _ = await _turn(tmp_path / "ok", slow=False)
    replayed, shown = await _turn(tmp_path / "slow", slow=True, outage_s=360)
    assert replayed == acknowledged, "the late replay billed the warm prefix as a write"
    assert replayed["cost_nanos"] <= shown.cost.cost_nanos


async def test_a_replay_to_a_restarted_prefix_cache_bills_the_read_it_was(tmp_path: Path) -> None:
    """prefix-cache restarted with its warm state in memory: the replay found nothing warm and
    billed the read as a write. The read the Plan saw on arrival is the record."""
    acknowledged, _ = await _turn(tmp_path / "ok", slow=False)
    replayed, _ = await _turn(tmp_path / "slow", slow=True, outage_s=10, restart=True)
    assert replayed == acknowledged, "the replay after a restart billed the read as a write"
