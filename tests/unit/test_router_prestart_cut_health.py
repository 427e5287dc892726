"""A provider replica whose calls stall after the provider reported the prompt (Anthropic's
message_start) but before any token: its model service ends each call a margin before the
deadline with a ``start`` (flagged ``cut_before_first_token``) and an interrupted end carrying
the reported usage, so that the prompt is billed. That start is no first report: the call
counts for the replica's health as a deadline before a start does (a failure when the call
had its predicted time to first token and the replica gave no sign of life meanwhile), and
it feeds neither the replica's prefill rate nor its signs of life. The clock is injected."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code, RequestError
from services.router.pipeline import Pipeline
from tests.unit.test_router_replica_ejection import (
    REPLICAS,
    Clock,
    Models,
    Stream,
    _ask,
    _pipeline,
)

PROVIDER = "claude-sonnet-4-5"  # anthropic-1 and anthropic-2
DEADLINE_S = 2.0  # each call's (the client's): within the 5 s cool-off after an ejection


@dataclass
class StallsAfterTheReport(Models):
    """``stalled`` replicas: a start at the call's deadline (the prompt the provider
    reported; ``flagged``: as a model service that says so), then the interrupted end with
    that usage and no output; others answer."""

    stalled: set[str] = field(default_factory=set)
    flagged: bool = True

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> Stream:
        if replica not in self.stalled:
            return super().generate(replica, request, deadline_s)
        self.calls.append(replica)
        self.clock.now += deadline_s  # the whole deadline, less its end margin: at it
        start = model_pb2.GenerateStart(
            replica=replica,
            prompt_tokens=5012,
            kv_cached_unreported=True,
            backend="anthropic",
            cut_before_first_token=self.flagged,
        )
        usage = pc.ProviderUsage(
            anthropic=pc.AnthropicUsage(input_tokens=12, cache_creation_input_tokens=5000)
        )
        end = model_pb2.GenerateEnd(
            stop_reason="interrupted",
            interrupted=True,
            error=f"no answer within the deadline ({deadline_s:.1f}s)",
            provider_usage=usage,
        )
        return Stream([model_pb2.GenerateChunk(start=start), model_pb2.GenerateChunk(end=end)])


def _stalling(clock: Clock, *replicas: str, flagged: bool = True) -> StallsAfterTheReport:
    return StallsAfterTheReport(clock, {}, stalled=set(replicas), flagged=flagged)


async def _asks(pipeline: Pipeline, n: int, remaining_s: float, first: int = 0) -> int:
    """``n`` requests to the provider's model (ids from ``first``); how many failed
    DEADLINE_EXCEEDED."""
    failed = 0
    for i in range(first, first + n):
        try:
            await _ask(pipeline, i, remaining_s=remaining_s, model=PROVIDER)
        except RequestError as exc:
            assert exc.code == Code.DEADLINE_EXCEEDED, exc
            assert "billed for its prompt" in exc.message, exc.message
            failed += 1
    await pipeline.drain()
    return failed


async def test_a_one_replica_models_replica_stalling_after_the_usage_report_is_ejected() -> None:
    """As one with no start by its deadline: after three such calls in a row it is ejected
    (an ``auto`` request then tries another tier first); it is still used, as the last."""
    clock = Clock()
    models = _stalling(clock, "anthropic-1")
    pipeline = _pipeline(models, {**REPLICAS, PROVIDER: ("anthropic-1",)})
    health = pipeline._dispatch.health(PROVIDER)
    ejected_after = []
    for i in range(5):
        await _asks(pipeline, 1, remaining_s=DEADLINE_S, first=i)
        ejected_after.append(health.ejected("anthropic-1", clock()))
    print(f"\nejected after each of 5 calls: {ejected_after}")
    assert ejected_after == [False, False, True, True, True]


async def test_a_replica_stalling_after_the_usage_report_is_ejected() -> None:
    """Three such calls in a row, then it is left out and anthropic-2 serves the rest (each
    of the three billed its reported prompt)."""
    clock = Clock()
    models = _stalling(clock, "anthropic-1")
    pipeline = _pipeline(models)
    failed = await _asks(pipeline, 20, remaining_s=DEADLINE_S)
    print(f"\n{models.calls.count('anthropic-1')} of 20 requests went to the stalled replica")
    assert failed == 3 and models.calls.count("anthropic-1") == 3
    assert pipeline._dispatch.health(PROVIDER).ejected("anthropic-1", clock())


async def test_its_start_at_the_deadline_is_no_sample_of_its_prefill_rate() -> None:
    clock = Clock()
    models = _stalling(clock, "anthropic-1", "anthropic-2")
    pipeline = _pipeline(models)
    await _asks(pipeline, 2, remaining_s=DEADLINE_S)
    for replica in ("anthropic-1", "anthropic-2"):
        assert pipeline.loads.rate(replica, 1.0).samples == 0, replica
        assert pipeline.loads.progress(replica) == 0, replica  # no sign of life either
        assert pipeline.loads.loads() == {}  # each call released once


async def test_a_deadline_shorter_than_its_predicted_prefill_is_not_the_replicas_fault() -> None:
    """The same rule as for a deadline before a start: a call given less than its predicted
    time to first token (2,000 tokens at the prior 10,000 a second: 0.2 s) counts nothing."""
    clock = Clock()
    models = _stalling(clock, "anthropic-1", "anthropic-2")
    pipeline = _pipeline(models)
    failed = await _asks(pipeline, 8, remaining_s=0.1)  # 50 ms of it for the call
    assert failed == 8
    health = pipeline._dispatch.health(PROVIDER)
    assert not health.ejected("anthropic-1", clock()) and not health.ejected("anthropic-2", clock())


@pytest.mark.parametrize("flagged", [True, False])
async def test_an_older_model_service_start_counts_as_before(flagged: bool) -> None:
    """A start without the flag (a model service older than it) is a first report, as it
    was: the call outlasted its deadline mid-answer and counts nothing."""
    clock = Clock()
    models = _stalling(clock, "anthropic-1", "anthropic-2", flagged=flagged)
    pipeline = _pipeline(models)
    await _asks(pipeline, 6, remaining_s=DEADLINE_S)
    health = pipeline._dispatch.health(PROVIDER)
    ejected = [r for r in ("anthropic-1", "anthropic-2") if health.ejected(r, clock())]
    assert ejected == (["anthropic-1", "anthropic-2"] if flagged else [])
