"""A replica that hangs mid-answer (its call has streamed a few chunks, then nothing: a
SIGSTOPped engine) is treated as a cut once it has been silent for the floor
(``ROUTER_MID_ANSWER_STALL_S``, 10 ms here): while nothing has reached the caller the request
goes to another replica, the cut call is billed for what it produced (its FINAL) beside the
answer's, and the silence counts against the replica's health; once chunks were streamed the
caller gets UNAVAILABLE, as for any cut. The last replica left, a replica still streaming
other answers, and a floor of 0 are never cut. The clock is injected, and is the event loop's
(``run_on_clock``): the silence timer and the fakes' waits (a hung call's whole deadline, a
pause of ``HANG_S``) see one time. With the waits on real time a loaded machine fired the 10 ms
timer a millisecond late, which the watch reads as the router's own pause (``own_pause``), and
the hung call's real-time end came before the cut."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.env import ConfigError, Env
from services.common.errors import Code, RequestError
from services.common.model_overrides import with_context_windows
from services.common.models import ModelTable
from services.common.tokens import Tokenizer
from services.router import dispatch
from services.router.billing import Bills
from services.router.dependencies import CallFailed, Dependencies
from services.router.dispatch import SILENT_FACTOR, silent_after_s
from services.router.pipeline import Pipeline
from services.router.prompt_counts import count_prompt
from services.router.replica_state import ReplicaStates
from services.router.routing.model import RouterCard, load_router_model
from services.router.settings import RouterSettings
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeSemantic
from tests.unit.test_router_replica_ejection import REPLICAS, Clock, WarmOnLargeOne
from tests.unit.virtual_loop import run_on_clock

HANG_S = 0.5  # a paused call's pause, on the loop's clock: 50 floors
FLOOR_S = "0.01"
DEADLINE_S = 30.0


def _settings(floor_s: str = FLOOR_S) -> RouterSettings:
    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
            "CACHEMESH_API_KEYS_FILE": "/nonexistent",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "ROUTER_SEMANTIC_LEASE_WAIT_S": "0",
            "ROUTER_MID_ANSWER_STALL_S": floor_s,
        }
    )
    return RouterSettings.from_env(env, TABLE)


class Answering:
    """A call that answers: its start, ``texts`` chunks, its end."""

    def __init__(self, replica: str, texts: int = 2) -> None:
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=2000)
        end = model_pb2.GenerateEnd(output_tokens=texts, stop_reason="end_turn")
        self._chunks = iter(
            [
                model_pb2.GenerateChunk(start=start),
                *(model_pb2.GenerateChunk(text="ok") for _ in range(texts)),
                model_pb2.GenerateChunk(end=end),
            ]
        )

    async def read(self) -> model_pb2.GenerateChunk | None:
        return next(self._chunks, None)

    def cancel(self) -> None:
        pass


class HungMidAnswer:
    """A replica hung mid-answer: its start and ``texts`` chunks, then nothing until its
    deadline (the whole of it on the loop's clock, the test's: ``run_on_clock``)."""

    def __init__(self, models: Models, replica: str, texts: int, deadline_s: float) -> None:
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=2000)
        self._sent = [
            model_pb2.GenerateChunk(start=start),
            *(model_pb2.GenerateChunk(text="hel") for _ in range(texts)),
        ]
        self._models, self._replica, self._deadline_s = models, replica, deadline_s

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self._sent:
            return self._sent.pop(0)
        await asyncio.sleep(self._deadline_s)
        raise CallFailed(Code.DEADLINE_EXCEEDED, "deadline")

    def cancel(self) -> None:
        self._models.cancelled.append(self._replica)


class PausedMidAnswer:
    """A live replica paused mid-answer (its engine held up): its start and a chunk, then
    nothing for ``HANG_S`` on the loop's clock (50 floors), then the rest of its answer."""

    def __init__(self, models: Models, replica: str) -> None:
        self._models, self._replica = models, replica
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=2000)
        end = model_pb2.GenerateEnd(output_tokens=2, stop_reason="end_turn")
        self._chunks = [
            model_pb2.GenerateChunk(start=start),
            model_pb2.GenerateChunk(text="first, "),
            None,  # the pause
            model_pb2.GenerateChunk(text="then the rest"),
            model_pb2.GenerateChunk(end=end),
        ]

    async def read(self) -> model_pb2.GenerateChunk | None:
        if not self._chunks:
            return None
        chunk = self._chunks.pop(0)
        if chunk is None:
            await asyncio.sleep(HANG_S)
            chunk = self._chunks.pop(0)
        return chunk

    def cancel(self) -> None:
        self._models.cancelled.append(self._replica)


@dataclass
class Models:
    clock: Clock
    hung: dict[str, int] = field(default_factory=dict)  # replica -> texts before its silence
    paused: set[str] = field(default_factory=set)  # pause mid-answer, then answer
    calls: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Answering | HungMidAnswer | PausedMidAnswer:
        self.calls.append(replica)
        if replica in self.hung:
            return HungMidAnswer(self, replica, self.hung[replica], deadline_s)
        if replica in self.paused:
            return PausedMidAnswer(self, replica)
        return Answering(replica)


@dataclass
class Prefix(WarmOnLargeOne):
    """large-1 is warm (chosen first); the FINALs are kept: each is a call's bill."""

    finals: list[pc.CommitRequest] = field(default_factory=list)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_FINAL:
            self.finals.append(request)
        return await super().commit(request, deadline_s)


def _pipeline(
    models: Models,
    prefix: Prefix,
    floor_s: str = FLOOR_S,
    replicas: dict[str, tuple[str, ...]] = REPLICAS,
    table: ModelTable = TABLE,
) -> Pipeline:
    deps = Dependencies(FakeSemantic(), prefix, models, replicas)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(
        deps,
        table,
        TOKENIZER,
        trace.NoOpTracer(),
        _settings(floor_s),
        router,
        clock=models.clock,
    )


async def _ask(
    pipeline: Pipeline,
    i: int,
    *,
    streamed: bool,
    model: str = "sim-large",
    bills: Bills | None = None,
) -> list[pb.CompleteChunk]:
    request = build_request(f"question {i}", model=model, request_id=f"r{i}")
    run = pipeline.run(
        "tenant-a", request, streamed=streamed, time_remaining_s=DEADLINE_S, bills=bills
    )
    return [chunk async for chunk in run]


@pytest.mark.parametrize("texts", [0, 2], ids=["before-its-first-token", "after-two-chunks"])
def test_a_complete_on_a_replica_hung_mid_answer_is_handed_over_and_both_calls_billed(
    texts: int,
) -> None:
    """Complete: nothing reached the caller, so large-2 answers it; large-1's call is cut
    (cancelled), billed for its prompt and the tokens it sent (its own FINAL, in ``bills``)
    beside the answer's FINAL, and the silence counts as large-1's failure."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": texts})
        prefix = Prefix()
        pipeline = _pipeline(models, prefix)
        bills: Bills = []
        chunks = await _ask(pipeline, 0, streamed=False, bills=bills)
        await pipeline.drain()
        end = chunks[-1].end
        assert [c.WhichOneof("part") for c in chunks] == ["start", "end"]
        assert end.content[0].text == "okok"  # large-2's answer, none of large-1's words
        assert models.calls == ["large-1", "large-2"] and models.cancelled == ["large-1"]
        cut, answered = prefix.finals
        assert (cut.replica, answered.replica) == ("large-1", "large-2")
        assert cut.request_id != answered.request_id  # two calls, each billed once
        assert cut.output_tokens == TOKENIZER.count("hel" * texts)  # what it sent
        (bill,) = [await b for b in bills]
        assert bill is not None and bill.usage.input_tokens == 2000  # the cut call's bill
        assert pipeline._dispatch.health("sim-large")._replicas["large-1"].failures == 1

    run_on_clock(clock, scenario)


def test_a_stream_hung_before_its_first_token_is_handed_over() -> None:
    """StreamComplete with only the start received (held until the first token): as for
    Complete, another replica answers, and the caller sees one answer."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": 0})
        prefix = Prefix()
        pipeline = _pipeline(models, prefix)
        chunks = await _ask(pipeline, 0, streamed=True)
        await pipeline.drain()
        assert [c.WhichOneof("part") for c in chunks] == ["start", "delta", "delta", "end"]
        assert models.calls == ["large-1", "large-2"] and models.cancelled == ["large-1"]
        assert [f.replica for f in prefix.finals] == ["large-1", "large-2"]

    run_on_clock(clock, scenario)


def test_a_stream_hung_after_its_first_chunks_ends_unavailable_as_a_cut() -> None:
    """Chunks already reached the caller: as for a replica that dies there, the caller gets
    UNAVAILABLE naming the cut (not the rest of the wait), and the cut call is billed."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": 2})
        prefix = Prefix()
        pipeline = _pipeline(models, prefix)
        request = build_request("question 0", model="sim-large", request_id="r0")
        received: list[str | None] = []
        with pytest.raises(RequestError) as caught:
            run = pipeline.run("tenant-a", request, time_remaining_s=DEADLINE_S)
            async with contextlib.aclosing(run) as chunks:
                async for chunk in chunks:
                    received.append(chunk.WhichOneof("part"))
        await pipeline.drain()
        assert caught.value.code == Code.UNAVAILABLE and "silent mid-answer" in str(caught.value)
        assert received == ["start", "delta", "delta"]
        assert models.calls == ["large-1"] and models.cancelled == ["large-1"]
        (cut,) = prefix.finals
        assert cut.replica == "large-1" and cut.output_tokens == TOKENIZER.count("helhel") > 0

    run_on_clock(clock, scenario)


def test_a_replica_hung_mid_answer_is_ejected_after_three_silences() -> None:
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": 2})
        pipeline = _pipeline(models, Prefix())
        for i in range(6):
            chunks = await _ask(pipeline, i, streamed=False)
            assert chunks[-1].end.content[0].text == "okok"
        await pipeline.drain()
        assert models.calls.count("large-1") == 3  # then ejected: straight to large-2

    run_on_clock(clock, scenario)


def test_the_last_replica_is_not_cut_for_silence() -> None:
    """sim-small has one replica: no other could answer, so its silent call waits on to its
    deadline (cut there, as an answer outlasting it is), not cut at the floor."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"small-1": 2})
        pipeline = _pipeline(models, Prefix())
        with pytest.raises(RequestError) as caught:
            await _ask(pipeline, 0, streamed=False, model="sim-small")
        await pipeline.drain()
        assert caught.value.code == Code.DEADLINE_EXCEEDED
        assert "still running at its deadline" in str(caught.value)

    run_on_clock(clock, scenario)


ONE_EACH: dict[str, tuple[str, ...]] = {"sim-small": ("small-1",), "sim-large": ("large-1",)}
LONG_PROMPT = "clause " * 2000  # 2,000 tokens: over a context window of 1,000
SMALL_WINDOW = with_context_windows(TABLE, "sim-small=1000")


async def _ask_auto(
    pipeline: Pipeline, threshold: float, text: str = "question 0"
) -> pb.CompleteResponse:
    request = build_request(text, model="auto", request_id="r0")
    request.routing.threshold = threshold
    run = pipeline.run("tenant-a", request, streamed=False, time_remaining_s=DEADLINE_S)
    return [chunk async for chunk in run][-1].end


def test_an_auto_request_for_the_large_tier_alone_does_not_cut_its_last_replica() -> None:
    """``routing.threshold`` -1 accepts only the large tier's answer, so its one replica is
    the last one left: paused mid-answer for 50 floors, it is waited for and answers in full
    (it was cut, and the caller got UNAVAILABLE with the cut counted against the replica)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, paused={"large-1"})
        pipeline = _pipeline(models, Prefix(), replicas=ONE_EACH)
        end = await _ask_auto(pipeline, threshold=-1.0)
        await pipeline.drain()
        assert (end.model, end.content[0].text) == ("sim-large", "first, then the rest")
        assert models.calls == ["large-1"] and models.cancelled == []
        assert "large-1" not in pipeline._dispatch.health("sim-large")._replicas  # no failure

    run_on_clock(clock, scenario)


def test_an_auto_request_does_not_cut_its_last_replica_for_a_tier_too_small() -> None:
    """Routed to sim-large (threshold -0.999: sim-small accepted too), a prompt of 2,000
    tokens that sim-small's window of 1,000 cannot hold: sim-small could not take the request
    over, so large-1 paused mid-answer is waited for (it was cut, sim-small skipped as too
    small, and the caller got UNAVAILABLE)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, paused={"large-1"})
        pipeline = _pipeline(models, Prefix(), replicas=ONE_EACH, table=SMALL_WINDOW)
        end = await _ask_auto(pipeline, threshold=-0.999, text=LONG_PROMPT)
        await pipeline.drain()
        assert (end.model, end.content[0].text) == ("sim-large", "first, then the rest")
        assert models.calls == ["large-1"] and models.cancelled == []

    run_on_clock(clock, scenario)


def test_an_auto_requests_last_replica_silent_mid_answer_goes_to_another_tier() -> None:
    """The same large-routed request whose prompt sim-small can hold: large-1 hung mid-answer
    is cut at the floor and sim-small answers (not the whole deadline)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": 2})
        pipeline = _pipeline(models, Prefix(), replicas=ONE_EACH)
        end = await _ask_auto(pipeline, threshold=-0.999)
        await pipeline.drain()
        assert (end.model, end.content[0].text) == ("sim-small", "okok")
        assert models.calls == ["large-1", "small-1"] and models.cancelled == ["large-1"]

    run_on_clock(clock, scenario)


@pytest.mark.parametrize("hung", [False, True], ids=["answering", "silent-mid-answer"])
def test_an_auto_requests_watched_last_replica_counts_no_prompt_unless_silent(
    hung: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether another tier could take the request over is asked only at a silence: a large
    call that answers costs no count of the prompt for sim-small's window (it was counted,
    ~0.7 us a token, after the call started and before its first token reached the caller);
    one silent mid-answer is counted then (during large-1's call) and handed to sim-small."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": 2} if hung else {})
        counted_during: list[list[str]] = []  # the model calls made when each count was

        def counting(request: pb.CompleteRequest, tokenizer: Tokenizer) -> int:
            counted_during.append(list(models.calls))
            return count_prompt(request, tokenizer)

        monkeypatch.setattr(dispatch, "count_prompt", counting)
        pipeline = _pipeline(models, Prefix(), replicas=ONE_EACH)
        end = await _ask_auto(pipeline, threshold=-0.999)
        await pipeline.drain()
        if not hung:
            assert (end.model, models.calls, counted_during) == ("sim-large", ["large-1"], [])
        else:
            assert (end.model, models.calls) == ("sim-small", ["large-1", "small-1"])
            assert counted_during[0] == ["large-1"]

    run_on_clock(clock, scenario)


def test_a_floor_of_zero_turns_the_silence_cut_off() -> None:
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, hung={"large-1": 2})
        pipeline = _pipeline(models, Prefix(), floor_s="0")
        with pytest.raises(RequestError) as caught:
            await _ask(pipeline, 0, streamed=False)
        await pipeline.drain()
        assert caught.value.code == Code.DEADLINE_EXCEEDED and models.calls == ["large-1"]

    run_on_clock(clock, scenario)


class Streaming:
    """A long answer on large-1 beside the silent call: a token every 2 ms (on the loop's
    clock) until ``done``: the replica is alive, busy (a prefill batch holding the silent call)."""

    def __init__(self, done: asyncio.Event) -> None:
        start = model_pb2.GenerateStart(replica="large-1", prompt_tokens=2000)
        self._started: list[model_pb2.GenerateChunk] = [model_pb2.GenerateChunk(start=start)]
        self._done, self._ended = done, False

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self._started:
            return self._started.pop()
        if self._ended:
            return None
        if self._done.is_set():
            self._ended = True
            end = model_pb2.GenerateEnd(output_tokens=1, stop_reason="end_turn")
            return model_pb2.GenerateChunk(end=end)
        await asyncio.sleep(0.002)
        return model_pb2.GenerateChunk(text="o")

    def cancel(self) -> None:
        pass


class Paused:
    """A call whose tokens pause (the engine busy elsewhere), then resume: its answer."""

    def __init__(self, resumed: asyncio.Event) -> None:
        start = model_pb2.GenerateStart(replica="large-1", prompt_tokens=2000)
        self._chunks = [model_pb2.GenerateChunk(start=start), model_pb2.GenerateChunk(text="a")]
        self._resumed: asyncio.Event | None = resumed

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self._chunks:
            return self._chunks.pop(0)
        if self._resumed is None:
            return None
        await self._resumed.wait()
        self._resumed = None
        end = model_pb2.GenerateEnd(output_tokens=2, stop_reason="end_turn")
        self._chunks = [model_pb2.GenerateChunk(end=end)]
        return model_pb2.GenerateChunk(text="b")

    def cancel(self) -> None:
        raise AssertionError("a call on a replica streaming other answers was cut")


def test_a_call_paused_while_its_replica_streams_other_answers_is_not_cut() -> None:
    """The replica gives signs of life on its other call all along: it is busy, not hung.
    The floor here is 100 of the other call's token gaps (2 ms), and the pause 3 floors: a
    loaded machine that delays the event loop by tens of milliseconds (a 10 ms floor was cut
    so in a clean-clone run beside other work) still sees a sign of life within each floor."""
    clock = Clock()

    async def scenario() -> None:
        done, resumed = asyncio.Event(), asyncio.Event()

        @dataclass
        class Busy(Models):
            def generate(
                self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
            ) -> Answering | HungMidAnswer:
                self.calls.append(replica)
                long = request.request.request_id == "r0"
                return Streaming(done) if long else Paused(resumed)  # type: ignore[return-value]

        models = Busy(clock)
        floor_s = 0.2
        pipeline = _pipeline(models, Prefix(), floor_s=str(floor_s))
        long_answer = asyncio.create_task(_ask(pipeline, 0, streamed=True))
        paused = asyncio.create_task(_ask(pipeline, 1, streamed=False))
        await asyncio.sleep(3 * floor_s)  # paused past the floor; the long answer streams on
        resumed.set()
        assert (await paused)[-1].end.content[0].text == "ab"
        done.set()
        await long_answer
        await pipeline.drain()
        assert models.calls == ["large-1", "large-1"]

    run_on_clock(clock, scenario)


def test_the_silence_allowed_is_the_pace_times_the_factor_at_least_the_floor_plus_the_queue() -> (
    None
):
    assert silent_after_s(0.0, 10.0, 0.0) == 10.0  # no pace yet: the floor
    assert silent_after_s(0.05, 10.0, 0.0) == 10.0  # the simulator's pace: the floor
    assert silent_after_s(1.0, 10.0, 0.0) == SILENT_FACTOR * 1.0  # a slow engine's own pace
    assert silent_after_s(0.05, 10.0, 13.0) == 23.0  # a prompt's prefill queued there


def test_the_prefill_queued_at_a_replica_is_its_pending_calls_uncached_tokens_at_its_rate() -> None:
    states = ReplicaStates()
    assert states.pending_prefill_s("large-1", 150.0) == 0.0
    states.sent("large-1", 2000, 1500, [], 0.0)
    states.sent("large-1", 600, 600, [], 0.0)
    assert states.pending_prefill_s("large-1", 150.0) == pytest.approx(14.0)


@pytest.mark.parametrize("raw", ["-1", "ten", "nan"])
def test_the_floor_setting_is_validated(raw: str) -> None:
    with pytest.raises(ConfigError, match="ROUTER_MID_ANSWER_STALL_S"):
        _settings(raw)


def test_the_floor_defaults_to_ten_seconds_and_zero_is_valid() -> None:
    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
            "CACHEMESH_API_KEYS_FILE": "/nonexistent",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        }
    )
    assert RouterSettings.from_env(env, TABLE).mid_answer_stall_s == 10.0
    assert _settings("0").mid_answer_stall_s == 0.0
