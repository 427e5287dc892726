"""Through the router's request path: a replica whose calls keep failing (or hang, or cut
their answers after the first token) is ejected (it stops taking requests, their time and
their deadlines); after the cool-off one probe answering whole brings it back; when all are
ejected they still serve; a request's own fault (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), a
deadline shorter than its prefill or a caller that leaves counts for nothing; a simulated
replica that stalls hands its request over, a provider's does not. The clock is injected; a
stall's hand-over runs on the event loop's timer (a 10 ms floor here, ``fast_stall``): a test
whose fakes wait (``Hung``, ``Slow``, ``LongAnswer``, ``Behind``) runs on a loop whose time is
its clock (``run_on_clock``), so the timer and the router's measures see one time, however
loaded the machine (a 10 ms window's timer 1 ms late on real time reads as the router's own
pause, ``own_pause``, and the stall was not handed over before a real-time hang ended)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code, RequestError
from services.common.model_overrides import with_context_windows, with_prior_prefill
from services.common.models import ModelTable
from services.router import replica_state
from services.router.dependencies import CallFailed, Dependencies, PrefixPort
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeSemantic, _settings
from tests.unit.virtual_loop import run_on_clock
from tests.waits import reached

REPLICAS = {
    "sim-small": ("small-1",),
    "sim-large": ("large-1", "large-2"),
    "claude-sonnet-4-5": ("anthropic-1", "anthropic-2"),
    "local-small": ("local-1", "local-2"),  # self-hosted, no prior prefill rate in its row
}


@pytest.fixture
def fast_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall after twice the predicted prefill plus 10 ms, not 1 s: the tests stay quick."""
    monkeypatch.setattr(replica_state, "STALL_FLOOR_S", 0.01)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class WarmOnLargeOne:
    """prefix-cache's view: large-1 holds the prompt's prefix, so the chooser prefers it."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return pc.PlanResponse(
            prompt_tokens=2000,
            candidates=[
                pc.ReplicaCandidate(replica="large-1", warm_prefix_tokens=1984),
                pc.ReplicaCandidate(replica="large-2", warm_prefix_tokens=0),
            ],
            plan_id="p",
        )

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        return pc.CommitResponse(
            usage=pb.Usage(input_tokens=2000, output_tokens=request.output_tokens)
        )


class Stream:
    def __init__(self, chunks: list[model_pb2.GenerateChunk | CallFailed]) -> None:
        self._chunks = iter(chunks)

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = next(self._chunks, None)
        if isinstance(chunk, CallFailed):
            raise chunk
        return chunk

    def cancel(self) -> None:
        pass


@dataclass
class Slot:
    """A one-slot replica's slot: taken by a long answer, streaming, done."""

    taken: bool = False
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Models:
    clock: Clock
    failing: dict[str, CallFailed]
    takes_s: float | None = 1.0  # how long a failing call takes (None: its whole deadline)
    calls: list[str] = field(default_factory=list)
    cutting: set[str] = field(default_factory=set)  # cut right after their first token
    held: set[str] = field(default_factory=set)  # write a token, then keep writing
    hung: set[str] = field(default_factory=set)  # no report: DEADLINE_EXCEEDED after HANG_S
    slow: dict[str, float] = field(default_factory=dict)  # first report after so many s
    cancelled: list[str] = field(default_factory=list)  # the hung calls the router cancelled
    cancelled_at: list[float] = field(default_factory=list)  # ... and when (``Hung``'s)
    prefill_s: float = 0.0  # how long an answering call's prefill takes (its rate's sample)
    # one-slot replicas (llama-server --parallel 1): the first call there streams a long
    # answer until its slot is done, a call sent meanwhile waits for its end
    one_slot: dict[str, Slot] = field(default_factory=dict)
    behind_s: float | None = None  # a call waiting there ends DEADLINE_EXCEEDED after this
    # what each replica's first reports say of its queue (``tenant_fair_queue``; absent: unset,
    # as an older replica's)
    fair_queue: dict[str, bool] = field(default_factory=dict)
    # each replica's engine run its first reports name (``engine_instance``; absent: unset)
    runs: dict[str, str] = field(default_factory=dict)
    # (on the loop's clock)
    called: asyncio.Event = field(default_factory=asyncio.Event)  # a call was made

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Stream:
        self.calls.append(replica)
        self.called.set()
        failure = self.failing.get(replica)
        if failure is not None:
            self.clock.now += deadline_s if self.takes_s is None else self.takes_s
            return Stream([failure])
        if replica in self.hung:
            return Hung(self, replica, deadline_s)
        if replica in self.slow:
            return Slow(self, replica, self.slow[replica])
        slot = self.one_slot.get(replica)
        if slot is not None:
            if not slot.taken:
                slot.taken = True
                return LongAnswer(replica, slot)
            return Behind(self, replica, slot.done)
        self.clock.now += self.prefill_s
        start = model_pb2.GenerateStart(
            replica=replica, prompt_tokens=2000, engine_instance=self.runs.get(replica, "")
        )
        if replica in self.fair_queue:
            start.tenant_fair_queue = self.fair_queue[replica]
        if replica in self.cutting:
            died = CallFailed(Code.UNAVAILABLE, "the replica died mid-answer")
            return Stream(
                [model_pb2.GenerateChunk(start=start), model_pb2.GenerateChunk(text="o"), died]
            )
        if replica in self.held:
            return Held([model_pb2.GenerateChunk(start=start), model_pb2.GenerateChunk(text="o")])
        end = model_pb2.GenerateEnd(output_tokens=1, stop_reason="end_turn")
        return Stream(
            [
                model_pb2.GenerateChunk(start=start),
                model_pb2.GenerateChunk(text="ok"),
                model_pb2.GenerateChunk(end=end),
            ]
        )


class Held(Stream):
    """Its chunks, then the rest of the answer is still being written (the caller leaves)."""

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = await super().read()
        if chunk is None:
            await asyncio.Event().wait()
        return chunk


class Hung(Stream):
    """A hung replica's call: nothing, then its deadline: the whole of it on the event loop's
    clock, which must be the test's (``run_on_clock``)."""

    def __init__(self, models: Models, replica: str, deadline_s: float) -> None:
        super().__init__([])
        self._models, self._replica, self._deadline_s = models, replica, deadline_s

    async def read(self) -> model_pb2.GenerateChunk | None:
        await asyncio.sleep(self._deadline_s)
        raise CallFailed(Code.DEADLINE_EXCEEDED, "deadline")

    def cancel(self) -> None:
        self._models.cancelled.append(self._replica)
        self._models.cancelled_at.append(self._models.clock())


TICK_S = 0.002  # a long answer's token every 2 ms (on the loop's clock): far within the stall


class Slow(Stream):
    """A slow, live replica's call (a loaded engine): its first report after ``after_s`` on
    the event loop's clock, which must be the test's (``run_on_clock``: the router's stall
    timer and its measure of the stall then see one time), then its answer."""

    def __init__(self, models: Models, replica: str, after_s: float) -> None:
        end = model_pb2.GenerateEnd(output_tokens=1, stop_reason="end_turn")
        super().__init__([model_pb2.GenerateChunk(text="ok"), model_pb2.GenerateChunk(end=end)])
        self._models, self._replica, self._after_s = models, replica, after_s
        self._waited = False

    async def read(self) -> model_pb2.GenerateChunk | None:
        if not self._waited:
            await asyncio.sleep(self._after_s)
            self._waited = True
            start = model_pb2.GenerateStart(replica=self._replica, prompt_tokens=2000)
            return model_pb2.GenerateChunk(start=start)
        return await super().read()

    def cancel(self) -> None:
        if not self._waited:
            self._models.cancelled.append(self._replica)


class LongAnswer(Stream):
    """A long answer: its start, then a token every ``TICK_S`` on the event loop's clock,
    which must be the test's (``run_on_clock``), until its slot is done."""

    def __init__(self, replica: str, slot: Slot) -> None:
        super().__init__([])
        self._replica, self._slot = replica, slot
        self._started, self._ended = False, False

    async def read(self) -> model_pb2.GenerateChunk | None:
        if not self._started:
            self._started = True
            start = model_pb2.GenerateStart(replica=self._replica, prompt_tokens=2000)
            return model_pb2.GenerateChunk(start=start)
        if self._ended:
            return None
        if self._slot.done.is_set():
            self._ended = True
            end = model_pb2.GenerateEnd(output_tokens=400, stop_reason="end_turn")
            return model_pb2.GenerateChunk(end=end)
        await asyncio.sleep(TICK_S)
        self._slot.streaming.set()
        return model_pb2.GenerateChunk(text="o")


class Behind(Stream):
    """A call sent to a one-slot replica while it decodes another answer: its start comes
    once that answer has ended (or its deadline comes first: ``Models.behind_s``)."""

    def __init__(self, models: Models, replica: str, done: asyncio.Event) -> None:
        end = model_pb2.GenerateEnd(output_tokens=1, stop_reason="end_turn")
        super().__init__([model_pb2.GenerateChunk(text="ok"), model_pb2.GenerateChunk(end=end)])
        self._models, self._replica, self._done = models, replica, done
        self._waited = False

    async def read(self) -> model_pb2.GenerateChunk | None:
        if not self._waited:
            if self._models.behind_s is not None:
                await asyncio.sleep(self._models.behind_s)
                raise CallFailed(Code.DEADLINE_EXCEEDED, "deadline")
            await self._done.wait()
            self._waited = True
            start = model_pb2.GenerateStart(replica=self._replica, prompt_tokens=2000)
            return model_pb2.GenerateChunk(start=start)
        return await super().read()

    def cancel(self) -> None:
        if not self._waited:
            self._models.cancelled.append(self._replica)


def _pipeline(
    models: Models,
    replicas: dict[str, tuple[str, ...]] = REPLICAS,
    table: ModelTable = TABLE,
    *,
    view: PrefixPort | None = None,
    tracer: trace.Tracer | None = None,
) -> Pipeline:
    """The router's pipeline over ``models``, prefix-cache's view ``view`` (default: warm on
    large-1 only)."""
    deps = Dependencies(
        FakeSemantic(), WarmOnLargeOne() if view is None else view, models, replicas
    )
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(
        deps,
        table,
        TOKENIZER,
        tracer or trace.NoOpTracer(),
        _settings(),
        router,
        clock=models.clock,
    )


async def _ask(
    pipeline: Pipeline,
    i: int,
    remaining_s: float | None = None,
    *,
    streamed: bool = True,
    model: str = "sim-large",
) -> pb.CompleteResponse:
    request = build_request(f"question {i}", model=model, request_id=f"r{i}")
    run = pipeline.run("tenant-a", request, time_remaining_s=remaining_s, streamed=streamed)
    chunks = [c async for c in run]
    return chunks[-1].end


async def _leave_after_the_first_token(pipeline: Pipeline, i: int) -> None:
    request = build_request(f"question {i}", model="sim-large", request_id=f"r{i}")
    async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves


UNAVAILABLE = CallFailed(Code.UNAVAILABLE, "anthropic could not serve (529)")


def _replica_failed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cachemesh.router" and r.levelname == "WARNING" and "failed:" in r.getMessage()
    ]


async def test_a_failing_replica_is_ejected_after_three_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    models = Models(clock, {"large-1": UNAVAILABLE})
    pipeline = _pipeline(models)
    with caplog.at_level("WARNING", logger="cachemesh.router"):
        for i in range(20):
            assert (await _ask(pipeline, i)).content[0].text == "ok"
    await pipeline.drain()
    assert models.calls.count("large-1") == 3  # then ejected: 17 requests straight to large-2
    assert _replica_failed_lines(caplog) == ["replica large-1 of sim-large failed: UNAVAILABLE"]


def test_a_hung_replica_hands_its_requests_over_and_is_ejected(fast_stall: None) -> None:
    """A simulated (or self-hosted) replica with no first report long past its predicted
    prefill: the call is cancelled, billed to no one, and the next replica answers within the
    client's deadline; after three such stalls the hung replica is left out."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"large-1"})
        pipeline = _pipeline(models)
        for i in range(20):
            assert (await _ask(pipeline, i, remaining_s=30.0)).content[0].text == "ok"
        await pipeline.drain()
        assert models.calls.count("large-1") == 3 and models.cancelled == ["large-1"] * 3

    run_on_clock(clock, scenario)


def test_a_hung_providers_requests_wait_their_deadline_until_it_is_ejected(
    fast_stall: None,
) -> None:
    """A provider may bill the prompt of a call cancelled before its first token: such a call
    is not abandoned for another replica (paid twice), it runs to its deadline."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"anthropic-1"})
        pipeline = _pipeline(models)
        failed = 0
        for i in range(20):
            try:
                await _ask(pipeline, i, remaining_s=30.0, model="claude-sonnet-4-5")
            except RequestError as exc:
                assert exc.code == Code.DEADLINE_EXCEEDED
                failed += 1
        await pipeline.drain()
        assert failed == 3 and models.calls.count("anthropic-1") == 3
        assert models.cancelled == []  # each ran out its own deadline

    run_on_clock(clock, scenario)


def test_a_self_hosted_replica_hands_over_once_its_prefill_rate_is_measured(
    fast_stall: None,
) -> None:
    """local-small's row sets no prior rate: until a replica's rate is measured its
    predicted prefill is the router's global prior (hosted providers'), no ground to call a
    slow engine stalled, and a call to it has its whole deadline. Once measured, a call there
    with no first report is handed over at its stall, and the rate that stall showed (2,000
    tokens in the 0.41 s waited, ``ReplicaStates.stalled``) sends the next calls to local-2.
    (With the hung call's wait on real time the stall took no time on the clock, so it showed
    no rate, local-1 stayed the pick and stalled three times: that was the clocks' drift.)"""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"local-1"})
        pipeline = _pipeline(models)
        with pytest.raises(RequestError) as caught:
            for i in range(2):  # one of the two goes to local-1 first
                await _ask(pipeline, i, remaining_s=30.0, model="local-small")
        assert caught.value.code == Code.DEADLINE_EXCEEDED and models.cancelled == []
        models = Models(clock, {}, prefill_s=0.2)  # 2,000 tokens in 0.2 s: a measured rate
        pipeline = _pipeline(models)
        for i in range(4):
            await _ask(pipeline, i, model="local-small")
        models.hung.add("local-1")
        sent = len(models.calls)
        for i in range(4, 10):
            assert (await _ask(pipeline, i, remaining_s=30.0, model="local-small")).content
        await pipeline.drain()
        assert models.cancelled == ["local-1"]  # handed over at its stall
        # the first to local-1 (as fast as local-2 till then), handed over; then local-2's
        assert models.calls[sent:] == ["local-1"] + ["local-2"] * 6

    run_on_clock(clock, scenario)


def test_a_replica_streaming_another_answer_is_busy_not_stalled(fast_stall: None) -> None:
    """A one-slot replica (llama-server --parallel 1) decoding a long answer: a warm turn
    sent there waits for that answer's end with no first report, far past its predicted
    prefill, but the replica streams tokens all along: it is alive. The turn waits for it
    (not handed to a cold replica, its prompt prefilled again) and the wait counts nothing
    against the replica (three such would have ejected it)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {})
        pipeline = _pipeline(models)
        for i in range(3):
            slot = models.one_slot["large-1"] = Slot()
            long_answer = asyncio.create_task(_ask(pipeline, 2 * i, remaining_s=30.0))
            await reached(slot.streaming, "slot.streaming")
            turn = asyncio.create_task(_ask(pipeline, 2 * i + 1, remaining_s=30.0))
            await asyncio.sleep(0.1)  # 50 tokens of the long answer; the stall is at ~10 ms
            slot.done.set()
            assert (await turn).content[0].text == "ok"
            await long_answer
        await pipeline.drain()
        assert models.calls == ["large-1"] * 6 and models.cancelled == []
        assert not pipeline._dispatch.health("sim-large").ejected("large-1", clock())

    run_on_clock(clock, scenario)


def test_a_deadline_spent_waiting_behind_another_answer_is_not_the_replicas_fault() -> None:
    """The one replica (never handed over from) decodes a long answer while the call sent
    there runs out of its deadline: the replica was streaming all along, busy, not failing."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, behind_s=0.05)
        pipeline = _pipeline(models)
        slot = models.one_slot["small-1"] = Slot()
        long_answer = asyncio.create_task(_ask(pipeline, 0, model="sim-small"))
        await reached(slot.streaming, "slot.streaming")
        for i in range(1, 4):  # three in a row would eject a failing replica
            with pytest.raises(RequestError, match="DEADLINE_EXCEEDED"):
                await _ask(pipeline, i, remaining_s=30.0, model="sim-small")
        assert not pipeline._dispatch.health("sim-small").ejected("small-1", clock())
        slot.done.set()
        await long_answer
        await pipeline.drain()

    run_on_clock(clock, scenario)


def test_a_call_decoding_on_a_one_slot_engine_occupies_its_replica() -> None:
    """local-small's engine serves one request at a time (its row's replica_slots): while an
    answer decodes there, a request sent to that replica would wait for its end, and the
    queue model says so; the answer's end frees the replica."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {})
        pipeline = _pipeline(models)
        slots = models.one_slot = {"local-1": Slot(), "local-2": Slot()}
        long_answer = asyncio.create_task(_ask(pipeline, 0, model="local-small"))
        streaming = [asyncio.create_task(slot.streaming.wait()) for slot in slots.values()]
        await asyncio.wait(streaming, return_when=asyncio.FIRST_COMPLETED)
        replica = next(r for r, slot in slots.items() if slot.streaming.is_set())
        assert pipeline.loads.queued_s(replica, 1_000.0, clock()) > 0.0
        slots[replica].done.set()
        await long_answer
        for task in streaming:
            task.cancel()
        await pipeline.drain()
        assert pipeline.loads.queued_s(replica, 1_000.0, clock()) == 0.0
        assert pipeline.loads.loads() == {}

    run_on_clock(clock, scenario)


def test_a_self_hosted_prefill_whose_caller_left_keeps_its_replica_busy() -> None:
    """llama-server prefills a prompt to its end after its caller gave up on it before its
    first token: the replica stays busy for the predicted rest of that prefill, so the next
    turn is not sent there as to an idle replica (to wait, or be handed over as a stall)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"local-1", "local-2"})
        pipeline = _pipeline(models)
        asked = asyncio.create_task(_ask(pipeline, 0, model="local-small"))
        await reached(models.called, "models.called")
        asked.cancel()  # the caller leaves before the first token
        with contextlib.suppress(asyncio.CancelledError):
            await asked
        replica = models.calls[0]
        assert models.cancelled == [replica] and pipeline.loads.loads() == {}
        # 2,000 tokens at the router's prior of 10,000 tokens/s: 0.2 s of prefill left there
        assert pipeline.loads.queued_s(replica, 10_000.0, clock()) == pytest.approx(0.2)
        clock.now += 0.2
        assert pipeline.loads.queued_s(replica, 10_000.0, clock()) == 0.0
        await pipeline.drain()

    run_on_clock(clock, scenario)


def test_a_slow_replica_is_given_the_time_its_stall_showed_not_ejected(
    fast_stall: None,
) -> None:
    """Self-hosted replicas measured while idle (2,000 tokens in 0.01 s), then 4x slower (a
    loaded machine): a first call past the stall window is handed over, and the rate that
    stall showed (at most 2,000 tokens in the window) gives the next call twice that time:
    it answers, and a live replica is not stalled on every call until it is ejected. On the
    test's clock (``run_on_clock``): with the stall timer on real time and the slow replica's
    wait on the clock, a loaded machine let the timer fire after 30 ms of real time when the
    clock had moved 4-24 ms, so each stall showed a rate too fast and the next call stalled
    too (3 to 6 calls cancelled, in 5 runs of 20)."""
    clock = Clock()

    async def scenario() -> tuple[Models, Pipeline]:
        models = Models(clock, {}, prefill_s=0.01)
        pipeline = _pipeline(models)
        for i in range(4):
            await _ask(pipeline, i, model="local-small")
        models.slow["local-1"] = 0.04
        models.slow["local-2"] = 0.04  # the machine is loaded: both are 4x slower
        for i in range(4, 10):
            assert (await _ask(pipeline, i, remaining_s=30.0, model="local-small")).content
        await pipeline.drain()
        return models, pipeline

    began = clock()
    models, pipeline = run_on_clock(clock, scenario)
    # the first slow call stalled (handed over); then at most one stall each, then the time
    # they need
    assert 1 <= len(models.cancelled) <= 2
    assert not pipeline._dispatch.health("local-small").ejected("local-1", clock())
    assert not pipeline._dispatch.health("local-small").ejected("local-2", clock())
    assert clock() - began < 1.0  # the calls' time only: no cool-off passed unseen


def test_the_last_replica_is_never_handed_over_from(fast_stall: None) -> None:
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"large-1", "large-2"})
        pipeline = _pipeline(models)
        with pytest.raises(RequestError) as caught:
            await _ask(pipeline, 0, remaining_s=30.0)
        assert caught.value.code == Code.DEADLINE_EXCEEDED
        assert "handed over to the next replica" in str(caught.value)  # large-1's stall
        assert models.calls == ["large-1", "large-2"] and models.cancelled == ["large-1"]

    run_on_clock(clock, scenario)


async def test_a_replica_that_cuts_every_call_after_its_first_token_is_ejected() -> None:
    """Its first token is no success: each call it cuts counts, and after three it is left
    out instead of cutting every request sent there (each billed twice, and re-run)."""
    clock = Clock()
    models = Models(clock, {}, cutting={"large-1"})
    pipeline = _pipeline(models)
    for i in range(20):  # Complete: a cut answer is re-run on large-2
        assert (await _ask(pipeline, i, streamed=False)).content[0].text == "ok"
    await pipeline.drain()
    assert models.calls.count("large-1") == 3


async def test_a_probe_cut_after_its_first_token_ejects_the_replica_again() -> None:
    clock = Clock()
    models = Models(clock, {"large-1": UNAVAILABLE})
    pipeline = _pipeline(models)
    for i in range(3):
        await _ask(pipeline, i, streamed=False)  # ejected
    del models.failing["large-1"]
    models.cutting.add("large-1")  # back, but it cuts its answers
    clock.now += 5.0  # the cool-off is over
    await _ask(pipeline, 3, streamed=False)
    assert models.calls[-2:] == ["large-1", "large-2"]  # the probe, cut; re-run on large-2
    clock.now += 9.9  # ejected again, for twice as long
    sent = len(models.calls)
    await _ask(pipeline, 4, streamed=False)
    await pipeline.drain()
    assert models.calls[sent:] == ["large-2"]


async def test_a_caller_that_leaves_after_the_first_token_counts_for_nothing() -> None:
    """Neither a failure (the replica was answering) nor a success (its answer never ended)."""
    clock = Clock()
    models = Models(clock, {}, cutting={"large-1"})
    pipeline = _pipeline(models)
    for i in range(2):
        await _ask(pipeline, i, streamed=False)  # two cuts
    models.cutting.clear()
    models.held.add("large-1")
    for i in range(2, 7):
        await _leave_after_the_first_token(pipeline, i)
    assert models.calls.count("large-1") == 7  # not ejected by the callers that left
    models.held.clear()
    models.cutting.add("large-1")
    await _ask(pipeline, 7, streamed=False)  # the third cut in a row: ejected
    sent = len(models.calls)
    await _ask(pipeline, 8, streamed=False)
    await pipeline.drain()
    assert models.calls[sent:] == ["large-2"]


async def test_after_the_cool_off_one_probe_and_a_success_brings_it_back() -> None:
    clock = Clock()
    models = Models(clock, {"large-1": UNAVAILABLE})
    pipeline = _pipeline(models)
    for i in range(3):
        await _ask(pipeline, i)
    del models.failing["large-1"]  # its provider is back
    await _ask(pipeline, 3)
    assert models.calls[-1] == "large-2"  # still cooling off
    clock.now += 5.0  # ROUTER_EJECT_BASE_S's default
    await _ask(pipeline, 4)
    assert models.calls[-1] == "large-1"  # the probe: served, so back in service
    await _ask(pipeline, 5)
    assert models.calls[-1] == "large-1"  # warm: the chooser's pick again
    await pipeline.drain()


async def test_when_every_replica_is_ejected_they_still_serve() -> None:
    clock = Clock()
    down = {"large-1": UNAVAILABLE, "large-2": UNAVAILABLE}
    models = Models(clock, dict(down))
    pipeline = _pipeline(models)
    for i in range(3):
        with pytest.raises(RequestError):
            await _ask(pipeline, i)
    assert pipeline._dispatch.health("sim-large").ejected("large-1", clock())
    assert pipeline._dispatch.health("sim-large").ejected("large-2", clock())
    models.failing.clear()
    assert (await _ask(pipeline, 3)).content[0].text == "ok"  # not refused for the ejection
    await pipeline.drain()


@pytest.mark.parametrize("code", [Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED])
async def test_a_requests_own_fault_does_not_count_against_the_replica(code: Code) -> None:
    clock = Clock()
    models = Models(clock, {"large-1": CallFailed(code, "the prompt is over the window")})
    pipeline = _pipeline(models)
    for i in range(5):
        with pytest.raises(RequestError):
            await _ask(pipeline, i)
    await pipeline.drain()
    assert models.calls == ["large-1"] * 5  # still the chooser's pick: never ejected
    assert not pipeline._dispatch.health("sim-large").ejected("large-1", clock())


async def test_a_deadline_shorter_than_the_prefill_is_not_the_replicas_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nor is it logged as the replica's failure: a WARNING "replica ... failed:
    DEADLINE_EXCEEDED" for each caller's short --timeout sent operators to healthy replicas."""
    clock = Clock()
    hung = CallFailed(Code.DEADLINE_EXCEEDED, "deadline")
    models = Models(clock, {"large-1": hung, "large-2": hung}, takes_s=None)
    pipeline = _pipeline(models)
    with caplog.at_level("WARNING", logger="cachemesh.router"):
        for i in range(5):  # 0.5 ms past the 50 ms reply margin: less than any replica's
            with pytest.raises(RequestError):  # predicted prefill of 16+ tokens
                await _ask(pipeline, i, remaining_s=0.0505)
    await pipeline.drain()
    assert len(models.calls) == 5  # each call was sent (and cut at its deadline)
    assert not pipeline._dispatch.health("sim-large").ejected("large-1", clock())
    assert _replica_failed_lines(caplog) == []


@dataclass
class SharedAddress(Models):
    """One address serving two models (a model service with several provider rows): only
    ``sim-large``'s calls there fail (its provider overloaded)."""

    large_there: int = 0

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Stream:
        if replica == "shared-1" and request.model == "sim-large":
            self.calls.append(replica)
            self.large_there += 1
            self.clock.now += 1.0
            return Stream([UNAVAILABLE])
        return super().generate(replica, request, deadline_s)


async def test_one_models_failures_on_a_shared_address_do_not_eject_the_other_model() -> None:
    """Health was kept per address: sim-large's three failures on shared-1 ejected it for
    sim-small too, and sim-small's answers there brought it back for sim-large, which went on
    failing on it. Each model's replicas are now judged by that model's calls alone."""
    clock = Clock()
    models = SharedAddress(clock, {})
    shared = {"sim-small": ("shared-1",), "sim-large": ("shared-1", "large-2")}
    pipeline = _pipeline(models, shared)
    for i in range(12):
        assert (await _ask(pipeline, 2 * i)).content[0].text == "ok"
        assert (await _ask(pipeline, 2 * i + 1, model="sim-small")).content[0].text == "ok"
    await pipeline.drain()
    assert pipeline._dispatch.health("sim-large").ejected("shared-1", clock())
    assert not pipeline._dispatch.health("sim-small").ejected("shared-1", clock())
    large_there = [c for c in models.calls if c == "shared-1"][:-12]  # sim-small's are 12
    assert len(large_there) <= 3  # ejected for sim-large after its three failures, kept out


async def _ask_auto(
    pipeline: Pipeline,
    i: int,
    threshold: float,
    remaining_s: float | None = None,
    text: str = "question",
) -> pb.CompleteResponse:
    """An ``auto`` request with its own ``routing.threshold`` (1.0: the small tier)."""
    request = build_request(f"{text} {i}", model="auto", request_id=f"r{i}")
    request.routing.threshold = threshold
    run = pipeline.run("tenant-a", request, time_remaining_s=remaining_s)
    chunks = [c async for c in run]
    return chunks[-1].end


def test_an_auto_request_on_a_hung_one_replica_tier_is_handed_to_the_next_tier(
    fast_stall: None,
) -> None:
    """sim-small's one replica hung: its tier's last replica is not the last option of an
    ``auto`` request (sim-large's are), so its stall hands the request over to sim-large
    within the client's deadline (it waited the whole deadline there: DEADLINE_EXCEEDED on
    every small-routed request, even once small-1 was ejected)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"small-1"})
        pipeline = _pipeline(models)
        for i in range(6):
            answer = await _ask_auto(pipeline, i, threshold=1.0, remaining_s=30.0)
            assert answer.model == "sim-large" and answer.content[0].text == "ok"
        await pipeline.drain()
        assert models.cancelled == ["small-1"] * 3  # stalled and handed over; then ejected

    run_on_clock(clock, scenario)


async def test_an_auto_tier_whose_replicas_are_all_ejected_comes_after_the_next_tiers() -> None:
    """Once small-1 is ejected, a small-routed ``auto`` request goes to sim-large's healthy
    replicas first, not to the ejected one (its failure, or its whole deadline, each time)."""
    clock = Clock()
    models = Models(clock, {"small-1": UNAVAILABLE})
    pipeline = _pipeline(models)
    for i in range(10):
        answer = await _ask_auto(pipeline, i, threshold=1.0)
        assert answer.model == "sim-large" and answer.content[0].text == "ok"
    await pipeline.drain()
    assert models.calls.count("small-1") == 3  # then ejected: sim-large's replicas first
    assert pipeline._dispatch.health("sim-small").ejected("small-1", clock())


def test_an_auto_tiers_last_replica_is_not_handed_over_to_a_tier_too_small(
    fast_stall: None,
) -> None:
    """Routed to sim-large (threshold -0.999: sim-small accepted too) with a prompt of 2,000
    tokens that sim-small's window of 1,000 cannot hold: no later tier could take it, so
    large-1, alive but slower than predicted (its first report after 0.5 s, 50 stall floors),
    is the request's last replica and is waited for (it was cancelled as stalled, sim-small
    skipped as too small, and the caller got UNAVAILABLE)."""
    clock = Clock()
    models = Models(clock, {}, slow={"large-1": 0.5})
    one_each: dict[str, tuple[str, ...]] = {"sim-small": ("small-1",), "sim-large": ("large-1",)}
    table = with_context_windows(TABLE, "sim-small=1000")

    async def scenario() -> pb.CompleteResponse:
        pipeline = _pipeline(models, one_each, table)
        prompt = "clause " * 2000
        answer = await _ask_auto(pipeline, 0, threshold=-0.999, remaining_s=60.0, text=prompt)
        await pipeline.drain()
        return answer

    answer = run_on_clock(clock, scenario)  # ``Slow`` waits on the loop's clock
    assert answer.model == "sim-large" and answer.content[0].text == "ok"
    assert models.calls == ["large-1"] and models.cancelled == []


def test_a_call_is_not_handed_over_to_a_replica_stalled_the_same_way(fast_stall: None) -> None:
    """Two self-hosted replicas whose row's prior rate (2,000 tokens in 10 ms) the engines miss
    6x (a loaded machine, as the two llama-server replicas of ``test_llama_engine.py`` at their
    first calls, the row's 150 tokens a second against ~50): two requests sent at once go one
    to each, and both pass their stall window. Each replica's call then looks hung, but so
    does the other replica's: neither has given a sign of life since its own call's prefill
    began. Handing each over to the other swapped them (each engine prefilled both prompts;
    live, both first turns came after 15.7 s, each conversation on the other's replica); each
    waits on where it is instead, and its answer measures the engine's rate."""
    clock = Clock()
    table = with_prior_prefill(TABLE, "local-small=200000")

    async def scenario() -> tuple[Models, list[pb.CompleteResponse]]:
        models = Models(clock, {}, slow={"local-1": 0.06, "local-2": 0.06})
        pipeline = _pipeline(models, table=table)
        answers = await asyncio.gather(
            *(_ask(pipeline, i, remaining_s=30.0, model="local-small") for i in (0, 1))
        )
        await pipeline.drain()
        return models, list(answers)

    began = clock()
    models, answers = run_on_clock(clock, scenario)
    assert all(answer.content for answer in answers)
    assert models.cancelled == [], models.cancelled  # was ['local-1', 'local-2']: swapped
    assert sorted(models.calls) == ["local-1", "local-2"], models.calls  # one call each
    assert clock() - began < 0.07  # each its 60 ms; was 30 ms each, then 60 ms again


def test_a_call_is_not_handed_over_to_a_replica_whose_first_report_showed_it_as_slow(
    fast_stall: None,
) -> None:
    """As above, but local-1 answers a little sooner than local-2 (25 and 35 ms against the
    prior's 10 ms and the stall window's 30 ms): at local-2's stall window local-1 has just
    given its first report, so it is not overdue, yet that report measured its engine 2.5x
    slower than the prior. Predicted at that rate, local-2's call (35 ms) is no stall (its
    window would be 60 ms): it waits on where it is. Handing it over put both conversations
    on local-1 (its engine prefilling the second prompt again, from scratch): the live flake
    of ``test_llama_kv_routing.py`` on a loaded machine, ``{'A': ':11634', 'B': ':11634'}``."""
    clock = Clock()
    table = with_prior_prefill(TABLE, "local-small=200000")

    async def scenario() -> tuple[Models, list[pb.CompleteResponse]]:
        models = Models(clock, {}, slow={"local-1": 0.025, "local-2": 0.035})
        pipeline = _pipeline(models, table=table)
        answers = await asyncio.gather(
            *(_ask(pipeline, i, remaining_s=30.0, model="local-small") for i in (0, 1))
        )
        await pipeline.drain()
        return models, list(answers)

    models, answers = run_on_clock(clock, scenario)
    assert all(answer.content for answer in answers)
    assert models.cancelled == [], models.cancelled  # was ['local-2']: handed over
    assert sorted(models.calls) == ["local-1", "local-2"], models.calls  # one call each


def test_a_hung_replicas_call_is_handed_over_once_the_other_has_shown_life(
    fast_stall: None,
) -> None:
    """local-1 hangs while local-2, slow but live, has a call of its own overdue: at local-1's
    stall window (30 ms) the hand-over waits (local-2 looks as slow). local-2 answers at
    40 ms, its first report measuring it 4x slower than the prior: at the next window (60 ms)
    the call is held once more (at that rate it is no stall yet), and at the third (90 ms)
    it goes there, the slower-sibling hold granted within one window of that measure only
    (before, it held the call to 120 ms; before the hold, it left at 60 ms): a hung engine's
    request still leaves it within a few windows, not at its deadline."""
    clock = Clock()
    table = with_prior_prefill(TABLE, "local-small=200000")

    async def scenario() -> list[pb.CompleteResponse]:
        models = Models(clock, {}, hung={"local-1"}, slow={"local-2": 0.04})
        pipeline = _pipeline(models, table=table)
        answers = await asyncio.gather(
            *(_ask(pipeline, i, remaining_s=30.0, model="local-small") for i in (0, 1))
        )
        await pipeline.drain()
        assert models.cancelled == ["local-1"]  # handed over from local-1 ...
        assert models.calls == ["local-1", "local-2", "local-2"]  # ... to local-2
        return list(answers)

    began = clock()
    answers = run_on_clock(clock, scenario)
    assert all(answer.content for answer in answers)
    assert clock() - began < 0.2  # two windows of 30 ms and local-2's 40 ms, not 30 s


async def _another_call(
    loads: replica_state.ReplicaStates, replica: str, sent_s: float, reported_s: float
) -> None:
    """Another request's call on ``replica``, as the router's loads see it: sent ``sent_s``
    from now (2,000 tokens to prefill), its first report ``reported_s`` from now (on the
    loop's clock), then its end. (Through the pipeline, a call that slow on an unmeasured
    replica would itself be handed over at its stall window.)"""
    loop = asyncio.get_running_loop()
    ticket = loads.sent(replica, 2000, 2000, (), loop.time() + sent_s)
    await asyncio.sleep(reported_s)
    loads.started(replica, ticket, 2000, 0, loop.time())
    loads.ended(replica, ticket, loop.time(), 1)


def test_a_hung_replicas_call_is_held_for_a_slower_sibling_one_window_more_at_most(
    fast_stall: None,
) -> None:
    """local-2 has another call, sent 500 ms ago, whose prefill the prior predicts done; the
    request goes to local-1 (the two predicted alike), which hangs. 20 ms later local-2's
    first report measures its engine, since the call opened, 52x slower than the prior: at
    that rate local-1's call is no stall until 1.05 s. It is held at its first window (30 ms),
    the first after that measure, only: at its second (60 ms) it is handed over to local-2,
    as a hung engine's call should be. Before, the hold lasted as long as that rate said: it
    left at 1.08 s (a sibling 40x slower than that: never before its deadline)."""
    clock = Clock()
    table = with_prior_prefill(TABLE, "local-small=200000")

    async def scenario() -> tuple[Models, pb.CompleteResponse, float]:
        models = Models(clock, {}, hung={"local-1"})
        pipeline = _pipeline(models, table=table)
        other = asyncio.ensure_future(
            _another_call(pipeline._dispatch.loads, "local-2", -0.5, 0.02)
        )
        sent = clock()
        answer = await _ask(pipeline, 1, remaining_s=30.0, model="local-small")
        await other
        await pipeline.drain()
        return models, answer, sent

    models, answer, sent = run_on_clock(clock, scenario)
    assert answer.content
    assert models.calls == ["local-1", "local-2"], models.calls
    assert models.cancelled == ["local-1"], models.cancelled
    # at its second window, two of 30 ms: was 1.08 s
    assert [round(at - sent, 3) for at in models.cancelled_at] == [0.06]


def test_a_sibling_measured_slow_before_the_call_opened_does_not_hold_it(
    fast_stall: None,
) -> None:
    """local-1's last call had its first report 20 s after it was sent (2,000x slower than
    the prior); it has nothing queued now. local-2, never measured, hangs on the next
    request. No rate measured since that call opened says its stall is the machine's: it is
    handed over at its first window (30 ms), as before the slower-sibling hold. The hold
    against that old measure kept it to its deadline (a RequestError at 30 s, where handed
    over it is answered at once)."""
    clock = Clock()
    table = with_prior_prefill(TABLE, "local-small=200000")

    async def scenario() -> tuple[Models, pb.CompleteResponse, float]:
        models = Models(clock, {}, hung={"local-2"})
        pipeline = _pipeline(models, table=table)
        await _another_call(pipeline._dispatch.loads, "local-1", 0.0, 20.0)
        await asyncio.sleep(1.0)
        sent = clock()
        answer = await _ask(pipeline, 1, remaining_s=30.0, model="local-small")
        await pipeline.drain()
        return models, answer, sent

    models, answer, sent = run_on_clock(clock, scenario)
    assert answer.content
    assert models.calls == ["local-2", "local-1"], models.calls
    assert models.cancelled == ["local-2"], models.cancelled
    assert [round(at - sent, 3) for at in models.cancelled_at] == [0.03]  # its first window


def test_a_measured_stalled_replica_is_handed_over_as_before(fast_stall: None) -> None:
    """Both replicas measured first (local-1 at the prior, local-2 4x slower); then local-1
    hangs: its call, predicted at its measured rate, is handed over at its first window
    (30 ms), as before the slower-sibling hold: local-2's slower measure does not hold it
    (the hold is only against a row's prior)."""
    clock = Clock()
    table = with_prior_prefill(TABLE, "local-small=200000")

    async def scenario() -> tuple[Models, pb.CompleteResponse, float]:
        models = Models(clock, {}, slow={"local-1": 0.01, "local-2": 0.04})
        pipeline = _pipeline(models, table=table)
        await asyncio.gather(
            *(_ask(pipeline, i, remaining_s=30.0, model="local-small") for i in (0, 1))
        )
        loads = pipeline._dispatch.loads
        assert all(loads.rate(r, 200000.0).samples > 0 for r in ("local-1", "local-2"))
        del models.slow["local-1"]
        models.hung.add("local-1")
        models.calls.clear()
        sent = clock()
        answer = await _ask(pipeline, 2, remaining_s=30.0, model="local-small")
        await pipeline.drain()
        return models, answer, sent

    models, answer, sent = run_on_clock(clock, scenario)
    assert answer.content
    assert models.calls == ["local-1", "local-2"], models.calls
    assert [round(at - sent, 3) for at in models.cancelled_at] == [0.03]  # not a window more


def test_a_call_that_failed_before_its_start_names_why_its_replica_was_chosen(
    fast_stall: None,
) -> None:
    """Each model call's span says why its replica was chosen, whatever the call's end: the
    stalled call handed over (and one refused) carry the reason, the predicted warm prefix
    and TTFT as the answered one does. Before, only a call that reached its first report
    had them: a stall's span named its replica and its error, not the decision that sent
    the request there (live: the 2.6 s predicted of a first turn that took 15.7 s)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, hung={"large-1"})
        pipeline = _pipeline(models, tracer=provider.get_tracer("t"))
        assert (await _ask(pipeline, 0, remaining_s=30.0)).content
        await pipeline.drain()

    run_on_clock(clock, scenario)
    chats = {
        str((span.attributes or {})["cachemesh.replica"]): dict(span.attributes or {})
        for span in memory.get_finished_spans()
        if span.name.startswith("chat ")
    }
    stalled, answered = chats["large-1"], chats["large-2"]
    assert stalled["error.type"] == "DEADLINE_EXCEEDED"  # the stall, handed over
    assert stalled["cachemesh.route_reason"] == "ttft_warm", stalled  # was absent
    assert stalled["cachemesh.kv_match_tokens"] == 1984  # the view's warm prefix there
    assert float(str(stalled["cachemesh.predicted_ttft_ms"])) > 0
    assert answered["cachemesh.route_reason"] == "fallback"
    assert answered["cachemesh.kv_cached_tokens"] == 0  # its start's report


@dataclass
class ViewOf:
    """prefix-cache's view (large-1 holding ``warm`` tokens of the prompt, large-2 none), and
    the commits the router sent."""

    warm: int
    commits: list[pc.CommitRequest] = field(default_factory=list)

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return pc.PlanResponse(
            prompt_tokens=2000,
            candidates=[
                pc.ReplicaCandidate(replica="large-1", warm_prefix_tokens=self.warm),
                pc.ReplicaCandidate(replica="large-2", warm_prefix_tokens=0),
            ],
            plan_id="p",
        )

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.commits.append(request)
        return pc.CommitResponse(
            usage=pb.Usage(input_tokens=2000, output_tokens=request.output_tokens)
        )


def _stalled_warm_named(warm: int) -> list[str]:
    """One request whose call to large-1 (``ViewOf(warm)``) stalls and is handed over to
    large-2: the replicas the WARM of large-2 names as stalled where predicted warm."""
    clock = Clock()
    view = ViewOf(warm)

    async def scenario() -> None:
        models = Models(clock, {}, hung={"large-1"})
        pipeline = _pipeline(models, view=view)
        assert (await _ask(pipeline, 1, remaining_s=30.0)).content[0].text == "ok"
        await pipeline.drain()
        assert models.calls == ["large-1", "large-2"] and models.cancelled == ["large-1"]

    run_on_clock(clock, scenario)
    warms = [c for c in view.commits if c.phase == pc.COMMIT_PHASE_WARM]
    assert [w.replica for w in warms] == ["large-2"]
    return list(warms[0].stalled_warm_replicas)


@pytest.mark.parametrize("warm", [1984, 0])
def test_a_call_stalled_where_it_was_predicted_warm_is_named_in_the_next_replicas_warm(
    fast_stall: None, warm: int
) -> None:
    """A replica predicted warm whose call stalls (a restarted engine prefilling cold) sends no
    commit, so its engine's report of no reuse never reached prefix-cache's view, which kept
    predicting it warm: the WARM of the replica that took the request over names it
    (``stalled_warm_replicas``), for the view to take as a report of nothing reused. A
    replica predicted cold that stalls tells the view nothing it does not hold."""
    assert _stalled_warm_named(warm) == (["large-1"] if warm else [])


@pytest.mark.parametrize("run", ["run-7", ""])
def test_the_warm_names_the_engine_run_that_answered(run: str) -> None:
    """The answering replica's engine run (``GenerateStart.engine_instance``) goes on its WARM
    (``replica_instance``), for prefix-cache to forget the replica's view when it changes (a
    restarted engine); an older replica's unset run goes unset."""
    clock = Clock()
    view = ViewOf(0)

    async def scenario() -> None:
        models = Models(clock, {}, runs={"large-1": run, "large-2": run})
        pipeline = _pipeline(models, view=view)
        assert (await _ask(pipeline, 1, remaining_s=30.0)).content[0].text == "ok"
        await pipeline.drain()

    run_on_clock(clock, scenario)
    warms = [c for c in view.commits if c.phase == pc.COMMIT_PHASE_WARM]
    assert [w.replica_instance for w in warms] == [run], warms


@pytest.mark.parametrize("warm", [16, 1000, 1008, 1024])
def test_a_stall_is_named_only_where_a_lost_prefix_explains_it(fast_stall: None, warm: int) -> None:
    """A cold prefill of the whole prompt overruns the stall bound (STALL_FACTOR times the
    warm one's, plus the floor) only when more than half of the prompt was predicted warm,
    and by more than the floor at the replica's rate: a replica predicted to reuse 16 (or
    1,000) of 2,000 tokens whose call stalls was slow or busy, not shown to have lost the
    prefix, and naming it would evict what it holds from the view. At 1,008 a cold prefill
    (0.500 s at sim-large's 4,000 tokens/s) stays under the bound (2 * 0.248 + 0.01 s: the
    16 tokens over half take 4 ms, the floor 10 ms), so it is not named either (it was, by the
    half share alone); at 1,024 it overruns it (0.500 s > 0.498 s)."""
    assert _stalled_warm_named(warm) == (["large-1"] if warm > 1008 else [])


@dataclass
class LocalViewOf(ViewOf):
    """prefix-cache's view of local-small's two one-slot replicas: local-1 warm."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return pc.PlanResponse(
            prompt_tokens=2000,
            candidates=[
                pc.ReplicaCandidate(replica="local-1", warm_prefix_tokens=self.warm),
                pc.ReplicaCandidate(replica="local-2", warm_prefix_tokens=0),
            ],
            plan_id="p",
        )


def test_a_warm_replica_whose_one_slot_a_slow_reader_holds_is_not_named_stalled(
    fast_stall: None,
) -> None:
    """A call predicted warm that waits for the replica's one slot (a caller reading another
    answer slowly holds it) and is handed over has not shown that the engine lost the prefix:
    its rate is not lowered for it, and neither is the view told of it (as it was: its WARM
    named local-1, and prefix-cache evicted the prompt's blocks there)."""
    clock = Clock()
    view = LocalViewOf(1984)

    async def scenario() -> Models:
        models = Models(clock, {}, prefill_s=0.01)
        pipeline = _pipeline(models, view=view)
        for i in range(4):  # the replicas' rates measured
            await _ask(pipeline, 100 + i, model="local-small")
        view.commits.clear()
        models.calls.clear()
        slot = models.one_slot["local-1"] = Slot()
        request = build_request("a long answer", model="local-small", request_id="held")
        async with contextlib.aclosing(pipeline.run("tenant-b", request)) as held:
            async for chunk in held:
                if chunk.WhichOneof("part") == "delta":
                    break
            assert pipeline.loads.slots_taken("local-1")
            await _ask(pipeline, 1, remaining_s=30.0, model="local-small")
            slot.done.set()
        await asyncio.sleep(0)
        await pipeline.drain()
        return models

    models = run_on_clock(clock, scenario)
    assert models.calls == ["local-1", "local-1", "local-2"] and models.cancelled == ["local-1"]
    warms = [c for c in view.commits if c.phase == pc.COMMIT_PHASE_WARM]
    assert [w.replica for w in warms] == ["local-1", "local-2"]
    assert [list(w.stalled_warm_replicas) for w in warms] == [[], []]
