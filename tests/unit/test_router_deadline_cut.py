"""An answer still running at its model call's deadline is not handed to another replica:
that replica would run into the same deadline, and each attempt is billed."""

from __future__ import annotations

import logging

import grpc
import pytest

from cachemesh import DeadlineExceededError
from cachemesh._errors import from_rpc_error
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code, RequestError
from services.router.dependencies import CallFailed
from services.router.model_answer import DeadlineCut
from tests.unit.test_router_pipeline import FakeClock, FakeModels, FakeStream, Rig, _request


class LongAnswers(FakeModels):
    """Each replica streams healthily until ``ends_at`` of its deadline (1.0: at it), then
    ends with ``ending``: the gRPC deadline's failure or the provider's interrupted end."""

    def __init__(
        self,
        clock: FakeClock,
        ending: str,
        ends_at: float = 1.0,
        code: Code = Code.DEADLINE_EXCEEDED,
        produced: int = 2000,
        visible: int = 0,
    ) -> None:
        super().__init__(clock=clock)
        self.ending, self.ends_at, self.code = ending, ends_at, code
        self.produced = produced  # the output tokens its interrupted end reports
        self.visible = visible  # and its visible pieces (0: not known, an older replica)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        self.deadlines.append(deadline_s)
        assert self.clock is not None
        self.clock.now += deadline_s * self.ends_at
        last: model_pb2.GenerateChunk | CallFailed = (
            CallFailed(self.code, self.code.name)
            if self.ending == "grpc"
            else model_pb2.GenerateChunk(
                end=model_pb2.GenerateEnd(
                    output_tokens=self.produced,
                    visible_pieces=self.visible,
                    stop_reason="interrupted",
                    interrupted=True,
                    error="no answer within the deadline (299.9s)",
                )
            )
        )
        return FakeStream(
            [
                model_pb2.GenerateChunk(
                    start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
                ),
                model_pb2.GenerateChunk(text="word " * 2000),
                last,
            ]
        )


async def _run(rig: Rig, remaining_s: float | None = 600) -> RequestError:
    pipeline = rig.pipeline()
    with pytest.raises(RequestError) as caught:
        # through the HTTP front: 600 s for the request, 300 s (ROUTER_MODEL_TIMEOUT_S) a call
        run = pipeline.run("t", _request(), streamed=False, time_remaining_s=remaining_s)
        _ = [c async for c in run]
    await pipeline.drain()
    return caught.value


@pytest.mark.parametrize("ending", ["grpc", "provider"])
async def test_an_answer_cut_by_its_deadline_is_not_run_again(ending: str) -> None:
    clock = FakeClock()
    models = LongAnswers(clock, ending)
    rig = Rig(models=models, clock=clock)
    error = await _run(rig)
    assert [replica for replica, _ in models.calls] == ["large-1"]
    assert error.code == Code.DEADLINE_EXCEEDED
    assert "ROUTER_MODEL_TIMEOUT_S" in error.message
    # its count (2,000) past max_tokens (512), but nothing sure of its visible output: the
    # ordinary advice
    assert "ask for a smaller max_tokens" in error.message, error.message
    assert "all of its max_tokens" not in error.message
    finals = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert len(finals) == 1 and finals[0].output_tokens > 0  # billed once, for what it made


async def test_an_answer_broken_off_well_before_its_deadline_goes_to_another_replica() -> None:
    clock = FakeClock()
    models = LongAnswers(clock, "provider", ends_at=0.1)
    rig = Rig(models=models, clock=clock)
    error = await _run(rig)  # every replica breaks off: the cut is what the client hears
    assert len(models.calls) > 1
    assert error.code == Code.UNAVAILABLE


class PromptOnly(FakeModels):
    """Each replica's provider reported the prompt (Anthropic's message_start: 12 input and
    5,000 cache-write tokens) and wrote nothing by the deadline: a start and an interrupted
    end with that usage, at the deadline."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        self.deadlines.append(deadline_s)
        assert self.clock is not None
        self.clock.now += deadline_s
        usage = pc.ProviderUsage(
            anthropic=pc.AnthropicUsage(input_tokens=12, cache_creation_input_tokens=5000)
        )
        end = model_pb2.GenerateEnd(
            stop_reason="interrupted",
            interrupted=True,
            error="no answer within the deadline (300.0s)",
            provider_usage=usage,
        )
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=5012)
        return FakeStream([model_pb2.GenerateChunk(start=start), model_pb2.GenerateChunk(end=end)])


async def test_a_call_cut_before_its_first_token_bills_the_reported_prompt() -> None:
    clock = FakeClock()
    models = PromptOnly(clock=clock)
    rig = Rig(models=models, clock=clock)
    error = await _run(rig)
    assert [replica for replica, _ in models.calls] == ["large-1"]  # not run again
    assert error.code == Code.DEADLINE_EXCEEDED
    assert "cut before its first token" in error.message, error.message
    assert "billed for its prompt" in error.message, error.message
    finals = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert len(finals) == 1 and finals[0].output_tokens == 0
    reported = finals[0].provider_usage.anthropic
    assert (reported.input_tokens, reported.cache_creation_input_tokens) == (12, 5000)


@pytest.mark.parametrize(("remaining_s", "routers"), [(600.0, True), (None, True), (100.0, False)])
async def test_a_cut_says_whose_deadline_it_was(remaining_s: float | None, routers: bool) -> None:
    """ROUTER_MODEL_TIMEOUT_S (300 s) before the caller's deadline (or none): the router's, a
    server fault its alert counts; the caller's sooner deadline: the caller's own."""
    clock = FakeClock()
    rig = Rig(models=LongAnswers(clock, "provider"), clock=clock)
    error = await _run(rig, remaining_s)
    assert isinstance(error, DeadlineCut) and error.code == Code.DEADLINE_EXCEEDED
    assert error.routers is routers
    named = "ROUTER_MODEL_TIMEOUT_S" if routers else "the request's deadline"
    assert named in error.message


async def test_a_callers_own_deadline_mid_answer_is_no_replica_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """20 requests whose own deadline (0.15 s, sooner than ROUTER_MODEL_TIMEOUT_S) passes
    mid-answer logged 20 WARNINGs "replica X failed mid-answer: DEADLINE_EXCEEDED", though
    the replica did nothing wrong (nor is it counted toward its ejection): now DEBUG."""
    clock = FakeClock()
    rig = Rig(models=LongAnswers(clock, "grpc"), clock=clock)
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    for _ in range(20):
        error = await _run(rig, remaining_s=0.15)
        assert isinstance(error, DeadlineCut) and not error.routers
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [], [r.getMessage() for r in warned]
    said = [r.getMessage() for r in caplog.records if "mid-answer" in r.getMessage()]
    assert len(said) == 20 and all("the request's own deadline" in m for m in said), said


@pytest.mark.parametrize(
    ("code", "remaining_s"), [(Code.UNAVAILABLE, 0.15), (Code.DEADLINE_EXCEEDED, 600.0)]
)
async def test_a_replicas_own_failure_mid_answer_stays_a_warning(
    caplog: pytest.LogCaptureFixture, code: Code, remaining_s: float
) -> None:
    """A replica that broke off mid-answer, or outlasted the router's ROUTER_MODEL_TIMEOUT_S
    (a server fault its alert counts), is still said as a WARNING."""
    clock = FakeClock()
    rig = Rig(models=LongAnswers(clock, "grpc", code=code), clock=clock)
    caplog.set_level(logging.DEBUG, logger="cachemesh")
    await _run(rig, remaining_s=remaining_s)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mid-answer" in m and code.name in m for m in warned), warned


@pytest.mark.parametrize(("remaining_s", "routers"), [(600.0, True), (100.0, False)])
async def test_an_answer_of_all_its_max_tokens_cut_at_the_deadline_is_not_told_to_lower_it(
    remaining_s: float, routers: bool
) -> None:
    """The answer had written all of its max_tokens (512) when its deadline came: what was
    late is its provider's end, not its length, so a smaller max_tokens is no advice (before,
    "A retry would be cut the same way; ask for a smaller max_tokens"); fewer tokens than that
    keep the advice."""
    clock = FakeClock()
    max_tokens = _request().max_tokens
    answers = LongAnswers(clock, "provider", produced=max_tokens, visible=max_tokens)
    rig = Rig(models=answers, clock=clock)
    error = await _run(rig, remaining_s)
    assert isinstance(error, DeadlineCut) and error.routers is routers
    print(f"\n{error.message}")
    assert "smaller max_tokens" not in error.message, error.message
    assert f"all of its max_tokens ({max_tokens})" in error.message, error.message
    assert ("retry later" in error.message) is routers  # the caller's: a longer deadline
    short = LongAnswers(clock, "provider", produced=max_tokens, visible=max_tokens - 1)
    fewer = Rig(models=short, clock=clock)
    assert "smaller max_tokens" in (await _run(fewer, remaining_s)).message
    # nor does the client's error add it (its text, ``cachemesh ask``'s line)
    told = from_rpc_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            error.message,
        ),
        "r1",
    )
    assert isinstance(told, DeadlineExceededError) and not told.smaller_max_tokens_helps
    assert "smaller max_tokens" not in str(told) and "longer deadline" in str(told)


@pytest.mark.parametrize(
    ("produced", "visible"),
    [(600, 0), (1921, 421), (2000, 0)],
    ids=["r1-thinking", "claude-hindi-estimate", "older-replica"],
)
async def test_a_count_past_max_tokens_is_not_taken_for_all_of_it(
    produced: int, visible: int
) -> None:
    """The output count is no sure figure of the visible answer: an R1-like row's 600 tokens
    of thinking (outside max_tokens) and no answer, a Claude answer in Hindi of 421 real tokens
    counted 1,921 by cl100k_base, or a replica that reports no pieces. Before, each was told
    it "had written all of its max_tokens" (512): only its visible pieces (each at least one
    provider token) reaching max_tokens say so now."""
    clock = FakeClock()
    rig = Rig(
        models=LongAnswers(clock, "provider", produced=produced, visible=visible), clock=clock
    )
    error = await _run(rig, 100.0)
    assert isinstance(error, DeadlineCut)
    assert "all of its max_tokens" not in error.message, error.message
    assert "Allow a longer deadline or a smaller max_tokens" in error.message
