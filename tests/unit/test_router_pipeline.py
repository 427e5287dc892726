"""The router's pipeline against fakes of its three ports (no gRPC, no processes).

Each test scripts what L1, prefix-cache and the model replicas answer, and checks what the
pipeline sends, streams and bills: a hit makes one call, a miss plans, calls the model,
commits twice and stores (after answering), a dependency that fails degrades the request or
hands it to the next replica, and a refusal that is the request's fault reaches the client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.tokens import Tokenizer, Tokenizers, load_cl100k
from services.router.billing import Charge
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies
from services.router.dispatch import Dispatcher
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from services.router.settings import RouterSettings

TABLE = load_model_table()
TOKENIZER = load_cl100k()
REPLICAS = {
    "sim-small": ("small-1",),
    "sim-large": ("large-1", "large-2"),
    "local-small": ("local-1",),
}


def _settings() -> RouterSettings:
    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
            "CACHEMESH_API_KEYS_FILE": "/nonexistent",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "ROUTER_SEMANTIC_LEASE_WAIT_S": "0",
        }
    )
    return RouterSettings.from_env(env, TABLE)


@dataclass
class FakeSemantic:
    reply: sc.LookupResponse | CallFailed = field(default_factory=sc.LookupResponse)
    lookups: list[sc.LookupRequest] = field(default_factory=list)
    stores: list[sc.StoreRequest] = field(default_factory=list)
    releases: list[sc.ReleaseRequest] = field(default_factory=list)
    renewals: list[sc.RenewRequest] = field(default_factory=list)

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        self.lookups.append(request)
        if isinstance(self.reply, CallFailed):
            raise self.reply
        return self.reply

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        self.stores.append(request)
        return sc.StoreResponse(stored=True, entry_id="e1")

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        self.releases.append(request)
        return sc.ReleaseResponse(released=True)

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        self.renewals.append(request)
        return sc.RenewResponse(renewed=True, lease_s=30.0)


@dataclass
class FakePrefix:
    down: bool = False
    plans: list[pc.PlanRequest] = field(default_factory=list)
    commits: list[pc.CommitRequest] = field(default_factory=list)
    read_tokens: int = 0  # the cache read of the WARM's split (the estimate)
    reported_read: int | None = None  # the FINAL reconciled with this provider-reported read

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        self.plans.append(request)
        if self.down:
            raise CallFailed(Code.UNAVAILABLE, "prefix-cache is down")
        return pc.PlanResponse(
            prompt_tokens=40,
            candidates=[pc.ReplicaCandidate(replica=r) for r in request.replicas],
            plan_id="plan-1",
        )

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.commits.append(request)
        if self.down:
            raise CallFailed(Code.UNAVAILABLE, "prefix-cache is down")
        usage = pb.Usage(
            input_tokens=40 - self.read_tokens,
            cache_read_input_tokens=self.read_tokens,
            output_tokens=request.output_tokens,
        )
        if request.phase == pc.COMMIT_PHASE_WARM:
            return pc.CommitResponse(usage=usage)
        cost = pb.Cost(cost_nanos=123, baseline_nanos=456, saved_nanos=333)
        if self.reported_read is None:
            return pc.CommitResponse(usage=usage, cost=cost)
        usage.input_tokens = 40 - self.reported_read
        usage.cache_read_input_tokens = self.reported_read
        return pc.CommitResponse(usage=usage, cost=cost, reconciled=True)


class FakeStream:
    def __init__(self, chunks: list[model_pb2.GenerateChunk | CallFailed]) -> None:
        self._chunks: Iterator[model_pb2.GenerateChunk | CallFailed] = iter(chunks)
        self.cancelled = False

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = next(self._chunks, None)
        if isinstance(chunk, CallFailed):
            raise chunk
        return chunk

    def cancel(self) -> None:
        self.cancelled = True


def _answer(replica: str, text: str = "Hello there.") -> list[model_pb2.GenerateChunk | CallFailed]:
    return [
        model_pb2.GenerateChunk(start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)),
        model_pb2.GenerateChunk(text=text),
        model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(output_tokens=3, stop_reason="end_turn")),
    ]


@dataclass
class FakeClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeModels:
    failing: set[str] = field(default_factory=set)  # replicas that fail before their start
    calls: list[tuple[str, model_pb2.GenerateRequest]] = field(default_factory=list)
    deadlines: list[float] = field(default_factory=list)  # each call's deadline_s
    failure: CallFailed = field(default_factory=lambda: CallFailed(Code.UNAVAILABLE, "died"))
    clock: FakeClock | None = None
    failing_takes_s: float = 0.0  # how long a failing replica takes to fail

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        self.deadlines.append(deadline_s)
        if replica in self.failing:
            if self.clock is not None:
                self.clock.now += self.failing_takes_s
            return FakeStream([self.failure])
        return FakeStream(_answer(replica))


@dataclass
class Rig:
    semantic: FakeSemantic = field(default_factory=FakeSemantic)
    prefix: FakePrefix = field(default_factory=FakePrefix)
    models: FakeModels = field(default_factory=FakeModels)
    clock: FakeClock = field(default_factory=FakeClock)
    wall: ManualClock = field(default_factory=ManualClock)  # the arrival a WARM carries

    outbox: BillingOutbox | None = None
    replicas: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(REPLICAS))
    tokenizers: Tokenizers | Tokenizer = TOKENIZER  # each row's, or one for all (cl100k rows)

    def pipeline(self) -> Pipeline:
        deps = Dependencies(self.semantic, self.prefix, self.models, self.replicas)
        router = (load_router_model(), RouterCard.load().default_threshold, None)
        settings = _settings()
        return Pipeline(
            deps,
            TABLE,
            self.tokenizers,
            trace.NoOpTracer(),
            settings,
            router,
            clock=self.clock,
            outbox=self.outbox,
            wall=self.wall,
        )

    async def run(
        self,
        request: pb.CompleteRequest,
        time_remaining_s: float | None = None,
        charge: Charge | None = None,
    ) -> list[pb.CompleteChunk]:
        pipeline = self.pipeline()
        run = pipeline.run("tenant-a", request, time_remaining_s=time_remaining_s, charge=charge)
        chunks = [chunk async for chunk in run]
        await pipeline.drain()  # the Stores and releases that run past the answer
        return chunks


def _request(model: str = "sim-large") -> pb.CompleteRequest:
    return build_request("How do I reset my password?", model=model, request_id="r1")


async def test_a_hit_is_one_lookup_and_is_served_free() -> None:
    rig = Rig()
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text="Use the reset link.")],
        model="sim-large",
        tier="large",
        stop_reason="end_turn",
        output_tokens=5,
    )
    match = pb.SemanticMatch(similarity=0.93, entry_id="e9")
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=cached, match=match)
    chunks = await rig.run(_request())
    assert [c.WhichOneof("part") for c in chunks] == ["start", "delta", "end"]
    end = chunks[-1].end
    assert end.served_by == pb.LAYER_SEMANTIC_CACHE and end.content[0].text == "Use the reset link."
    prompt = end.usage.input_tokens
    assert prompt > 0 and end.cost.cost_nanos == 0
    assert end.cost.baseline_nanos == prompt * 3000 + 5 * 15000  # sim-large's prices, by hand
    assert end.cost.saved_nanos == end.cost.baseline_nanos
    assert not rig.prefix.plans and not rig.prefix.commits and not rig.models.calls
    # the start tells the prompt's usage as a model answer's does: an HTTP caller reading
    # message_start's input_tokens counts an L1 hit's prompt too
    start = chunks[0].start.usage
    assert start.input_tokens == prompt and start.output_tokens == 0


async def test_a_hit_for_complete_is_its_end_alone_the_same_end_a_stream_gets() -> None:
    """``Complete`` reads only the end: a hit yields it alone (its start and deltas were made
    for nothing on every exact hit), the same end the stream's last chunk is."""
    rig = Rig()
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text="Use the reset"), pb.ContentBlock(text=" link.")],
        model="sim-large",
        tier="large",
        stop_reason="end_turn",
        output_tokens=5,
    )
    match = pb.SemanticMatch(similarity=1.0, entry_id="e9", exact=True)
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=cached, match=match)
    streamed = await rig.run(_request())
    pipeline = rig.pipeline()
    unary = [chunk async for chunk in pipeline.run("tenant-a", _request(), streamed=False)]
    assert [c.WhichOneof("part") for c in unary] == ["end"]
    end = unary[0].end
    end.trace_id, end.span_id = streamed[-1].end.trace_id, streamed[-1].end.span_id
    assert end == streamed[-1].end  # but for its request's span, the same end to the field
    assert end.semantic.exact and len(rig.semantic.lookups) == 2


def _cached(tier: str) -> sc.CachedAnswer:
    return sc.CachedAnswer(
        content=[pb.ContentBlock(text=f"The {tier} tier's answer.")],
        model=TABLE.for_tier(tier).id,
        tier=tier,
        stop_reason="end_turn",
        output_tokens=5,
    )


def _auto(threshold: float | None = None) -> pb.CompleteRequest:
    request = _request("auto")
    if threshold is not None:
        request.routing.threshold = threshold
    return request


async def test_an_auto_hit_below_the_tier_its_threshold_forces_is_not_served() -> None:
    """routing.threshold -1: every score reaches the large tier. The small tier's cached
    answer (the weak one the user is retrying) is not served as a free hit: the large model
    answers, and its answer is stored over the small one's. L1 is told which tiers the request
    accepts (so it refuses that hit, counted a miss); one that still answers it is overruled."""
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=_cached("small"))
    end = (await rig.run(_auto(-1.0)))[-1].end
    assert [list(lookup.accepted_tiers) for lookup in rig.semantic.lookups] == [["large"]]
    assert end.served_by == pb.LAYER_MODEL and end.tier == "large"
    assert end.cost.cost_nanos > 0
    assert [s.answer.tier for s in rig.semantic.stores] == ["large"]


@pytest.mark.parametrize(
    ("threshold", "tier"), [(None, "small"), (0.5, "small"), (-0.99, "small"), (-1.0, "large")]
)
async def test_an_auto_hit_at_or_above_the_lowest_tier_allowed_is_served(
    threshold: float | None, tier: str
) -> None:
    """Ordinary auto hits are served whatever their tier; so is a large answer to a request
    forcing the large tier, and any answer to one whose threshold some score stays below."""
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=_cached(tier))
    end = (await rig.run(_auto(threshold)))[-1].end
    accepted = [] if threshold != -1.0 else ["large"]  # [] = any
    assert [list(lookup.accepted_tiers) for lookup in rig.semantic.lookups] == [accepted]
    assert end.served_by == pb.LAYER_SEMANTIC_CACHE and end.tier == tier
    assert not rig.models.calls


async def test_a_miss_plans_calls_the_model_commits_twice_and_stores_the_answer() -> None:
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(leader=True, lease_id="lease-1")
    chunks = await rig.run(_request())
    assert [c.WhichOneof("part") for c in chunks] == ["start", "delta", "end"]
    assert chunks[1].delta.text == "Hello there."
    end = chunks[-1].end
    assert end.served_by == pb.LAYER_MODEL and end.model == "sim-large"
    assert (end.cost.cost_nanos, end.cost.baseline_nanos) == (123, 456)  # the FINAL's bill
    assert not end.cost.estimated
    assert [p.model for p in rig.prefix.plans] == ["sim-large"]
    assert [c.phase for c in rig.prefix.commits] == [pc.COMMIT_PHASE_WARM, pc.COMMIT_PHASE_FINAL]
    warm = rig.prefix.commits[0]
    assert warm.plan_id == "plan-1" and not warm.HasField("request")  # not sent again
    assert rig.prefix.commits[1].output_tokens == 3
    (store,) = rig.semantic.stores
    assert store.answer.content[0].text == "Hello there." and store.answer.output_tokens == 3
    assert not rig.semantic.releases  # the Store ends the lease


async def test_a_leaders_store_names_its_lease_and_a_non_leaders_names_none() -> None:
    """L1 ends only the lease a Store names: the late Store of a call whose lease aged out
    (taken since by another request) must not end the lease that request holds now. A request
    that did not lead names none (L1 then ends the key's lease, as before)."""
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(leader=True, lease_id="lease-1")
    await rig.run(_request())
    rig.semantic.reply = sc.LookupResponse(pending=True)  # its wait ran out: it calls the model
    await rig.run(_request())
    assert [store.lease_id for store in rig.semantic.stores] == ["lease-1", ""]


@dataclass
class ThinkingModels(FakeModels):
    """Each answer's end reports 2 of its 3 output tokens as the model's thinking."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        chunks = _answer(replica)
        end = chunks[-1]
        assert isinstance(end, model_pb2.GenerateChunk)
        end.end.reasoning_tokens = 2
        return FakeStream(chunks)


@pytest.mark.parametrize("prefix_down", [False, True])
async def test_the_answers_usage_says_how_much_of_its_output_was_thinking(
    prefix_down: bool,
) -> None:
    """The provider's reasoning count reached the Gateway's usage nowhere (an OpenAI SDK
    read completion_tokens_details.reasoning_tokens 0 for a reasoning model's answer)."""
    rig = Rig(models=ThinkingModels(), prefix=FakePrefix(down=prefix_down))
    end = (await rig.run(_request()))[-1].end
    assert (end.usage.output_tokens, end.usage.reasoning_tokens) == (3, 2)


async def test_with_prefix_cache_down_the_answer_is_served_at_an_estimated_cost() -> None:
    rig = Rig(prefix=FakePrefix(down=True))
    end = (await rig.run(_request()))[-1].end
    assert end.served_by == pb.LAYER_MODEL and end.cost.estimated
    assert end.cost.cost_nanos == 40 * 3000 + 3 * 15000  # the engine's count, base prices
    assert rig.models.calls  # the model still answered


async def test_an_answer_whose_bill_is_kept_but_not_durably_is_served_and_billed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """prefix-cache down and the journal's fsync failing: the bill's line is in the journal
    (billed once if the router lives), so the caller, who pays for the answer, gets it at an
    estimated cost; before, it was refused UNAVAILABLE, billed all the same, and its retry
    was a second model call and a second bill. The router's log says the bill is not
    durable; its paths stay there."""

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    outbox = BillingOutbox(FakePrefix(down=True), Journal(tmp_path), 1.0, 0.01)
    rig = Rig(prefix=FakePrefix(down=True), outbox=outbox)
    monkeypatch.setattr(os, "fsync", fsync)
    end = (await rig.run(_request()))[-1].end
    assert end.served_by == pb.LAYER_MODEL and end.cost.estimated
    assert len(rig.models.calls) == 1
    assert outbox.pending >= 1  # billed once prefix-cache is back
    assert any("served, its bill kept but not durably" in r.message for r in caplog.records)


async def test_a_full_outbox_in_memory_refuses_model_calls_until_its_bills_are_taken() -> None:
    """No ROUTER_DATA_DIR and prefix-cache down: the outbox in memory holds every answer's
    commits (each carries its whole request). Past ROUTER_OUTBOX_MAX_BYTES a request that needs
    a model call is refused before the model is paid, instead of growing the router without
    bound; a semantic-cache hit is still served, and once prefix-cache takes the bills model
    calls resume. Nothing kept is dropped."""
    prefix = FakePrefix(down=True)
    outbox = BillingOutbox(prefix, None, 1.0, 0.01, max_memory_bytes=1)  # full after one
    rig = Rig(prefix=prefix, outbox=outbox)
    pipeline = rig.pipeline()

    async def answer() -> pb.CompleteResponse:
        return [chunk async for chunk in pipeline.run("tenant-a", _request())][-1].end

    assert (await answer()).cost.estimated and outbox.pending == 1
    assert outbox.full
    calls = len(rig.models.calls)
    for _ in range(3):
        with pytest.raises(RequestError) as caught:
            await answer()
        assert caught.value.code == Code.UNAVAILABLE
        assert "ROUTER_OUTBOX_MAX_BYTES" in caught.value.message
    assert len(rig.models.calls) == calls and outbox.pending == 1  # no model paid, none kept
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text="Use the reset link.")],
        model="sim-large",
        tier="large",
        stop_reason="end_turn",
        output_tokens=5,
    )
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=cached)
    assert (await answer()).served_by == pb.LAYER_SEMANTIC_CACHE  # L1 bills nothing: served
    rig.semantic.reply = sc.LookupResponse()
    prefix.down = False
    assert await outbox.flush() == 1 and not outbox.full
    assert not (await answer()).cost.estimated  # model calls resume


def test_the_outbox_bound_is_read_at_start_and_zero_is_a_bound() -> None:
    base = {
        "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
        "CACHEMESH_API_KEYS_FILE": "/nonexistent",
        "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
    }
    assert RouterSettings.from_env(Env(base), TABLE).outbox_max_bytes == 256 * 1024 * 1024
    zero = {**base, "ROUTER_OUTBOX_MAX_BYTES": "0"}
    assert RouterSettings.from_env(Env(zero), TABLE).outbox_max_bytes == 0
    with pytest.raises(ConfigError, match="ROUTER_OUTBOX_MAX_BYTES"):
        RouterSettings.from_env(Env({**base, "ROUTER_OUTBOX_MAX_BYTES": "-1"}), TABLE)


async def test_a_replica_failing_before_its_first_token_hands_over_to_the_next() -> None:
    rig = Rig(models=FakeModels(failing={"large-1"}))
    end = (await rig.run(_request()))[-1].end
    assert end.served_by == pb.LAYER_MODEL
    assert [replica for replica, _ in rig.models.calls] == ["large-1", "large-2"]


async def test_when_every_replica_fails_the_lease_is_released_and_unavailable_raised() -> None:
    rig = Rig(models=FakeModels(failing={"large-1", "large-2"}))
    rig.semantic.reply = sc.LookupResponse(leader=True, lease_id="lease-1")
    pipeline = rig.pipeline()
    with pytest.raises(RequestError) as caught:
        _ = [chunk async for chunk in pipeline.run("tenant-a", _request())]
    await pipeline.drain()
    assert caught.value.code == Code.UNAVAILABLE
    assert [r.lease_id for r in rig.semantic.releases] == ["lease-1"]  # waiters freed now
    assert not rig.semantic.stores


async def test_l1_down_degrades_to_the_model_and_l1_refusing_the_request_reaches_the_client() -> (
    None
):
    down = Rig(semantic=FakeSemantic(reply=CallFailed(Code.UNAVAILABLE, "gone")))
    assert (await down.run(_request()))[-1].end.served_by == pb.LAYER_MODEL
    refused = Rig(semantic=FakeSemantic(reply=CallFailed(Code.INVALID_ARGUMENT, "bad scope")))
    with pytest.raises(RequestError) as caught:
        await refused.run(_request())
    assert caught.value.code == Code.INVALID_ARGUMENT and "bad scope" in caught.value.message
    assert not refused.models.calls  # nothing billed for a refused request


async def test_l1_too_busy_to_look_up_is_a_skip_and_the_model_answers() -> None:
    """semantic-cache answers a Lookup it has no room to embed with a skip at once (not
    RESOURCE_EXHAUSTED, which would reach the client as its own fault): the request goes on to
    the model, L1 not counted as down, and its answer is offered to L1."""
    busy = "semantic-cache is busy: 512 texts wait to be embedded (SEMANTIC_CACHE_EMBED_MAX_QUEUE)"
    rig = Rig(semantic=FakeSemantic(reply=sc.LookupResponse(skip_reason=busy)))
    end = (await rig.run(_request()))[-1].end
    assert end.served_by == pb.LAYER_MODEL and len(rig.models.calls) == 1
    assert len(rig.semantic.stores) == 1


async def test_no_store_mode_never_stores() -> None:
    rig = Rig()
    request = _request()
    request.cache.semantic = pb.SEMANTIC_MODE_NO_STORE
    await rig.run(request)
    assert rig.semantic.lookups and not rig.semantic.stores


@pytest.mark.parametrize(
    ("model", "read", "reported", "layer"),
    [
        # a self-hosted engine that reused only its chat template's opening (3 tokens): no hit
        ("local-small", 0, 3, pb.LAYER_MODEL),
        ("local-small", 0, 15, pb.LAYER_MODEL),
        ("local-small", 0, 16, pb.LAYER_PREFIX_CACHE),  # one full KV block
        ("local-small", 32, 32, pb.LAYER_PREFIX_CACHE),
        # Anthropic's rules: a read below the model's minimum cacheable prefix is none
        ("sim-large", 0, None, pb.LAYER_MODEL),
        ("sim-large", 1_023, None, pb.LAYER_MODEL),
        ("sim-large", 1_024, None, pb.LAYER_PREFIX_CACHE),
    ],
)
async def test_served_by_the_prefix_cache_only_for_a_real_prefix_reuse(
    model: str, read: int, reported: int | None, layer: int
) -> None:
    rig = Rig(prefix=FakePrefix(read_tokens=read, reported_read=reported))
    chunks = await rig.run(_request(model))
    start, end = chunks[0].start, chunks[-1].end
    assert end.served_by == layer
    assert end.usage.cache_read_input_tokens == (read if reported is None else reported)
    if reported is None:  # no report: the start said what the end says
        assert start.served_by == layer


def test_the_minimum_prefix_hit_of_each_rule_set() -> None:
    models = TABLE.models
    assert models["local-small"].min_prefix_hit_tokens == 16  # one KV block
    assert models["claude-sonnet-4-5"].min_prefix_hit_tokens == 1_024
    assert (
        models["claude-haiku-4-5"].min_prefix_hit_tokens
        == models["claude-haiku-4-5"].min_cacheable_tokens
    )
    assert models["gpt-4o"].min_prefix_hit_tokens == 1_024
    row = models["local-large"].model_dump(exclude_unset=True)
    configured = type(models["local-large"]).model_validate({**row, "min_cacheable_tokens": 256})
    assert configured.min_prefix_hit_tokens == 256  # a configured minimum above one block


async def test_the_clients_deadline_bounds_the_model_call() -> None:
    """The model call's deadline is the client's time left (less the router's margin to
    reply), or ROUTER_MODEL_TIMEOUT_S (300 s by default) when that is sooner or none was set."""
    rig = Rig()
    await rig.run(_request(), time_remaining_s=2.0)
    await rig.run(_request(), time_remaining_s=None)
    await rig.run(_request(), time_remaining_s=10_000.0)
    assert rig.models.deadlines == [pytest.approx(1.9), 300.0, 300.0]


async def test_a_spent_deadline_tries_no_other_replica_and_says_why() -> None:
    """large-1 gives up at the deadline; large-2 is not tried with no time left, and the
    client hears DEADLINE_EXCEEDED naming what the replica said."""
    clock = FakeClock()
    failure = CallFailed(
        Code.DEADLINE_EXCEEDED,
        "anthropic did not answer within the deadline (1.9s, 1 tries)",
        "no answer within the request's deadline (1.9 s)",
    )
    models = FakeModels(failing={"large-1", "large-2"}, failure=failure, clock=clock)
    models.failing_takes_s = 1.95
    rig = Rig(models=models, clock=clock)
    with pytest.raises(RequestError) as caught:
        await rig.run(_request(), time_remaining_s=2.0)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert [replica for replica, _ in models.calls] == ["large-1"]
    assert "no answer within the request's deadline (1.9 s)" in caught.value.message


async def test_a_replica_that_will_not_wait_hands_over_within_the_deadline() -> None:
    """A replica whose provider asked for a retry-after beyond the deadline fails at once
    (UNAVAILABLE, naming it): the next replica gets the time that is left."""
    clock = FakeClock()
    failure = CallFailed(
        Code.UNAVAILABLE,
        "anthropic could not serve (429 rate_limit_error: slow down); its retry-after ...",
        "anthropic 429 rate_limit_error; its retry-after (3.0 s) outlasts the request's "
        "deadline (1.9 s left)",
    )
    models = FakeModels(failing={"large-1"}, failure=failure, clock=clock)
    models.failing_takes_s = 0.5
    rig = Rig(models=models, clock=clock)
    end = (await rig.run(_request(), time_remaining_s=2.0))[-1].end
    assert end.stop_reason == "end_turn"
    assert [replica for replica, _ in models.calls] == ["large-1", "large-2"]
    assert models.deadlines == [pytest.approx(1.9), pytest.approx(1.4)]  # 1.9 s - 0.5 s
    # both refusing: UNAVAILABLE naming the reason (no replica address in it)
    models.failing = {"large-1", "large-2"}
    models.failing_takes_s = 0.0
    with pytest.raises(RequestError) as caught:
        await rig.run(_request(), time_remaining_s=2.0)
    assert caught.value.code == Code.UNAVAILABLE
    assert "retry-after (3.0 s) outlasts the request's deadline" in caught.value.message
    assert "large-" not in caught.value.message


async def test_a_failed_replicas_reason_does_not_become_the_tier_reason() -> None:
    failure = CallFailed(Code.UNAVAILABLE, "refused", "anthropic 429 rate_limit_error")
    models = FakeModels(failing={"large-1"}, failure=failure)
    rig = Rig(models=models)
    deps = Dependencies(rig.semantic, rig.prefix, models, REPLICAS)
    settings = _settings()
    dispatcher = Dispatcher(
        Calls(deps, settings),
        deps,
        TABLE,
        trace.NoOpTracer(),
        settings.choice,
        rig.clock,
        TOKENIZER,
    )
    attempt = await dispatcher.open("tenant-a", _request(), deadline=rig.clock() + 2.0)
    assert attempt.replica == "large-2" and attempt.tier_reason == "requested"
    attempt.stream.cancel()


@dataclass
class SlowWarmPrefix(FakePrefix):
    """A prefix-cache whose WARM commit waits until the test lets it answer."""

    warm_may_answer: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[str] = field(default_factory=list)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        phase = pc.CommitPhase.Name(request.phase)
        self.events.append(f"{phase} sent")
        if request.phase == pc.COMMIT_PHASE_WARM:
            await self.warm_may_answer.wait()
        reply = await super().commit(request, deadline_s)
        self.events.append(f"{phase} done")
        return reply


class LoggedStream(FakeStream):
    def __init__(self, chunks: list[model_pb2.GenerateChunk | CallFailed], log: list[str]) -> None:
        super().__init__(chunks)
        self._log = log

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = await super().read()
        self._log.append(f"read {chunk.WhichOneof('part') if chunk else 'eof'}")
        return chunk


async def test_the_warm_commit_runs_beside_the_answer_and_the_start_waits_for_it() -> None:
    prefix = SlowWarmPrefix(read_tokens=1_024)  # sim-large's minimum cacheable prefix
    rig = Rig(prefix=prefix)
    rig.models.generate = lambda replica, request, deadline_s: LoggedStream(  # type: ignore[method-assign]
        _answer(replica), prefix.events
    )
    run = rig.pipeline().run("tenant-a", _request())
    first = asyncio.ensure_future(run.__anext__())
    for _ in range(500):  # the read-ahead task's turns, however loaded the machine
        if "read text" in prefix.events:
            break
        await asyncio.sleep(0.01)
    # the first token was read while the WARM was still out; nothing reached the caller
    assert "read text" in prefix.events and "COMMIT_PHASE_WARM sent" in prefix.events
    assert "COMMIT_PHASE_WARM done" not in prefix.events and not first.done()
    prefix.warm_may_answer.set()
    start = (await first).start
    assert start.served_by == pb.LAYER_PREFIX_CACHE  # the WARM's cache read decides it
    # the prompt's split as the WARM priced it (Anthropic clients read it at message_start)
    assert (start.usage.input_tokens, start.usage.cache_read_input_tokens) == (40 - 1_024, 1_024)
    assert start.usage.output_tokens == 0
    rest = [chunk async for chunk in run]
    assert rest[-1].end.cost.cost_nanos == 123
    assert prefix.events.index("COMMIT_PHASE_WARM done") < prefix.events.index(
        "COMMIT_PHASE_FINAL sent"
    )


async def _warm_sent(prefix: SlowWarmPrefix) -> None:
    """Until the WARM is out, then 10 ms more for the answer's tokens (the fixed 10 ms alone
    was too short for the WARM on a loaded machine: the test failed with nothing sent)."""
    for _ in range(5_000):
        if prefix.events:
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)


async def test_a_caller_leaving_during_the_warm_commit_still_bills_the_prefill() -> None:
    prefix = SlowWarmPrefix()
    rig = Rig(prefix=prefix)
    pipeline = rig.pipeline()
    run = pipeline.run("tenant-a", _request())
    first = asyncio.ensure_future(run.__anext__())
    await _warm_sent(prefix)
    first.cancel()  # the caller leaves while the WARM is out
    with pytest.raises(asyncio.CancelledError):
        await first
    assert prefix.events == ["COMMIT_PHASE_WARM sent"]  # out, and not cancelled with it
    prefix.warm_may_answer.set()  # the WARM lands; then the FINAL bills the prompt
    await pipeline.drain()
    assert [c.phase for c in prefix.commits] == [pc.COMMIT_PHASE_WARM, pc.COMMIT_PHASE_FINAL]
    assert prefix.events[-2:] == ["COMMIT_PHASE_FINAL sent", "COMMIT_PHASE_FINAL done"]
    # billed for the prompt and the tokens the model produced before the caller left
    assert prefix.commits[1].output_tokens == 3 and not rig.semantic.stores


async def test_a_call_billed_without_its_answer_is_charged_to_the_tenants_limits() -> None:
    """What the FINAL of a call the caller left billed reaches ``charge`` (the limiter's):
    its cost and usage, once prefix-cache has priced it."""
    prefix = SlowWarmPrefix()
    rig = Rig(prefix=prefix)
    pipeline = rig.pipeline()
    charged: list[tuple[int, int]] = []

    def charge(usage: pb.Usage, cost: int, counted_ms: int | None = None) -> None:
        charged.append((usage.output_tokens, cost))

    run = pipeline.run("tenant-a", _request(), charge=charge)
    first = asyncio.ensure_future(run.__anext__())
    await _warm_sent(prefix)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert charged == []  # nothing billed yet: the WARM is out
    prefix.warm_may_answer.set()
    await pipeline.drain()
    assert charged == [(prefix.commits[1].output_tokens, 123)]


async def test_complete_reads_the_whole_answer_while_the_warm_commit_is_out() -> None:
    prefix = SlowWarmPrefix(read_tokens=1_024)
    rig = Rig(prefix=prefix)
    rig.models.generate = lambda replica, request, deadline_s: LoggedStream(  # type: ignore[method-assign]
        _answer(replica), prefix.events
    )
    run = rig.pipeline().run("tenant-a", _request(), streamed=False)
    first = asyncio.ensure_future(run.__anext__())
    for _ in range(500):  # the read-ahead task's turns, however loaded the machine
        if "read eof" in prefix.events:
            break
        await asyncio.sleep(0.01)
    assert "read eof" in prefix.events and "COMMIT_PHASE_WARM done" not in prefix.events
    prefix.warm_may_answer.set()
    chunks = [await first] + [chunk async for chunk in run]
    assert [c.WhichOneof("part") for c in chunks] == ["start", "end"]
    assert chunks[0].start.served_by == chunks[1].end.served_by == pb.LAYER_PREFIX_CACHE
    assert chunks[1].end.content[0].text == "Hello there."


class StoreDown(FakeSemantic):
    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        self.stores.append(request)
        raise CallFailed(Code.UNAVAILABLE, "semantic-cache is restarting")


async def test_a_store_failing_after_the_answer_is_recorded_in_the_requests_trace() -> None:
    # The Store runs after the answer: the request's span has ended by then, and an event
    # added to it would be dropped. It goes on a short span of its own under the request's.
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    rig = Rig(semantic=StoreDown(reply=sc.LookupResponse(leader=True, lease_id="lease-1")))
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(deps, TABLE, TOKENIZER, tracer, _settings(), router, clock=rig.clock)
    with tracer.start_as_current_span("Complete") as root:
        chunks = [c async for c in pipeline.run("tenant-a", _request())]
    await pipeline.drain()
    assert chunks[-1].end.served_by == pb.LAYER_MODEL and rig.semantic.stores
    (late,) = [s for s in exported.get_finished_spans() if s.name == "cachemesh.degraded"]
    assert late.parent is not None and late.parent.span_id == root.get_span_context().span_id
    (event,) = late.events
    assert event.name == "cachemesh.degraded"
    assert dict(event.attributes or {}) == {
        "dependency": "semantic-cache",
        "grpc.status": "UNAVAILABLE",
    }
