"""A call the client leaves is billed for what the model wrote: its text and its finished
tool calls (a tool call's arguments are output tokens the provider bills); a provider's stream
that broke, for what its model service counted (also a tool call cut in its arguments, and the
model's thinking, which the router never sees)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code, RequestError
from services.common.tokens import load_cl100k
from services.prefix_cache.api import PrefixCacheApi
from services.router.dependencies import CallFailed
from tests.unit.test_router_outbox_budgets import DownPort
from tests.unit.test_router_outbox_replay import _core
from tests.unit.test_router_pipeline import FakeModels, FakeStream, Rig, _request
from tests.waits import reached

ARGUMENTS = json.dumps({"path": "report.md", "content": "Quarterly revenue grew. " * 300})


class Held(FakeStream):
    """Its chunks, then a wait: the rest of the answer is still being written."""

    def __init__(self, chunks: list[model_pb2.GenerateChunk | CallFailed]) -> None:
        super().__init__(chunks)
        self.rest = asyncio.Event()
        self.waiting = asyncio.Event()  # its chunks were read: the reader waits for the rest

    async def read(self) -> model_pb2.GenerateChunk | None:
        chunk = await super().read()
        if chunk is None:
            self.waiting.set()
            await self.rest.wait()
        return chunk


class ToolModels(FakeModels):
    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        use = pb.ToolUse(id="toolu_01", name="write_file", input_json=ARGUMENTS)
        chunks: list[model_pb2.GenerateChunk | CallFailed] = [
            model_pb2.GenerateChunk(
                start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
            ),
            model_pb2.GenerateChunk(text="I'll write it."),
            model_pb2.GenerateChunk(block=pb.ContentBlock(tool_use=use)),
        ]
        return Held(chunks)


async def test_a_call_left_after_a_tool_call_bills_the_tool_calls_tokens() -> None:
    rig = Rig(models=ToolModels())
    pipeline = rig.pipeline()
    async with contextlib.aclosing(pipeline.run("tenant-a", _request())) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta" and chunk.delta.HasField("tool_use"):
                break  # the client leaves once it has the tool call
    await pipeline.drain()
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    tokenizer = load_cl100k()
    wrote = tokenizer.count("I'll write it.") + tokenizer.count("write_file" + ARGUMENTS)
    assert final.output_tokens == wrote


class BrokenInTheThinking(FakeModels):
    """A provider replica's stream that breaks while the model thinks after some text: its
    thinking went on as ``progress`` chunks, and the model service's interrupted end counts
    it (OpenAI's wire: no usage before the break)."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        progress = model_pb2.GenerateChunk(progress=model_pb2.GenerateProgress())
        end = model_pb2.GenerateEnd(
            output_tokens=1200,  # its text and its thinking, as the model service counted them
            stop_reason="interrupted",
            interrupted=True,
            error="APIConnectionError: Connection error.",
        )
        return FakeStream(
            [
                model_pb2.GenerateChunk(
                    start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
                ),
                model_pb2.GenerateChunk(text="Let me think."),
                *[progress] * 30,
                model_pb2.GenerateChunk(end=end),
            ]
        )


async def test_a_stream_broken_in_the_thinking_bills_what_the_model_service_counted() -> None:
    rig = Rig(models=BrokenInTheThinking())
    pipeline = rig.pipeline()
    with pytest.raises(RequestError) as caught:
        _ = [chunk async for chunk in pipeline.run("tenant-a", _request())]
    await pipeline.drain()
    assert caught.value.code == Code.UNAVAILABLE  # its text had reached the caller
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    # the thinking is output tokens the provider bills: not only the text's 4 tokens
    assert final.output_tokens == 1200


CUT_TEXT = "Quarterly revenue grew in every region, led by the Asia-Pacific segment."


class BrokenAfterItsUsage(FakeModels):
    """A self-hosted engine (OpenAI's wire) whose stream broke after its usage chunk: the model
    service's interrupted end carries the engine's report, its output count the report's
    ``completion_tokens``, counted with the engine's own vocabulary (fewer tokens for the text
    than the router's cl100k count of it)."""

    def __init__(self, prompt_tokens: int, completion_tokens: int) -> None:
        super().__init__()
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        report = pc.OpenAIUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )
        end = model_pb2.GenerateEnd(
            output_tokens=self.completion_tokens,
            stop_reason="interrupted",
            interrupted=True,
            error="APIConnectionError: Connection error.",
            provider_usage=pc.ProviderUsage(openai=report),
        )
        start = model_pb2.GenerateStart(
            replica=replica, prompt_tokens=self.prompt_tokens, kv_cached_unreported=True
        )
        return FakeStream(
            [
                model_pb2.GenerateChunk(start=start),
                model_pb2.GenerateChunk(text=CUT_TEXT),
                model_pb2.GenerateChunk(end=end),
            ]
        )


async def test_a_stream_broken_after_its_usage_report_is_billed_at_the_report() -> None:
    """The report's output count is what prefix-cache reconciles the FINAL against: a FINAL
    whose own output count differs is refused (INVALID_ARGUMENT). Before, the router sent the
    larger of its own count and the model service's (15 against the report's 12), prefix-cache
    refused it, and the outbox dropped it for good: the call, prompt and output, billed 0."""
    core, _ = _core()
    port = DownPort(PrefixCacheApi(core))
    port.down = False
    request = _request("local-small")
    plan = await core.plan("tenant-a", "local-small", request, [])
    ours = load_cl100k().count(CUT_TEXT)
    reported = ours - 3  # the engine's vocabulary
    rig = Rig(prefix=port, models=BrokenAfterItsUsage(plan.split.prompt_tokens, reported))  # type: ignore[arg-type]
    pipeline = rig.pipeline()
    with pytest.raises(RequestError):
        _ = [chunk async for chunk in pipeline.run("tenant-a", request)]
    await pipeline.drain()
    totals = await core.totals("tenant-a")
    assert totals.output_tokens == reported
    assert totals.cost_nanos > 0, "the cut call was not billed"


def _progress(output_tokens: int) -> model_pb2.GenerateChunk:
    return model_pb2.GenerateChunk(progress=model_pb2.GenerateProgress(output_tokens=output_tokens))


LEAD = "Let me think."
AFTER = "Revenue grew."


class Writing(FakeModels):
    """A model still writing its answer: its chunks so far, then nothing yet."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()  # the router read the chunks sent so far

    def chunks(self, replica: str) -> list[model_pb2.GenerateChunk | CallFailed]:
        raise NotImplementedError

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        held = Held(self.chunks(replica))
        held.waiting = self.waiting
        return held


class Thinking(Writing):
    """A reasoning model's answer still being written: some text, its thinking as ``progress``
    chunks carrying the model service's running count (up to 1,200: the text and the thinking;
    0 from an older model service, which counts nothing), more text, then nothing yet."""

    def __init__(self, counted: bool) -> None:
        super().__init__()
        self.counted = counted

    def chunks(self, replica: str) -> list[model_pb2.GenerateChunk | CallFailed]:
        counts = [40 * n if self.counted else 0 for n in range(1, 31)]  # 40 ... 1,200
        return [
            model_pb2.GenerateChunk(
                start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
            ),
            model_pb2.GenerateChunk(text=LEAD),
            *[_progress(count) for count in counts],
            model_pb2.GenerateChunk(text=AFTER),
        ]


class WritingATool(Writing):
    """A tool call half-written: its name and argument pieces as ``progress`` chunks (the
    model service's running count up to 900), the call itself never whole."""

    def chunks(self, replica: str) -> list[model_pb2.GenerateChunk | CallFailed]:
        return [
            model_pb2.GenerateChunk(
                start=model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
            ),
            model_pb2.GenerateChunk(text=LEAD),
            *[_progress(100 * n) for n in range(1, 10)],
        ]


async def _left_while_writing(models: Writing) -> pc.CommitRequest:
    """The caller leaves once the router has read all the model has sent so far; the FINAL."""
    rig = Rig(models=models)
    pipeline = rig.pipeline()
    deltas: list[pb.CompleteChunk] = []

    async def consume() -> None:
        async for chunk in pipeline.run("tenant-a", _request()):
            deltas.append(chunk)

    task = asyncio.create_task(consume())
    await reached(models.waiting, "models.waiting")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await pipeline.drain()
    assert deltas, "the caller left before the router read the answer"
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    return final


async def test_a_call_left_while_the_model_thinks_bills_the_thinking() -> None:
    final = await _left_while_writing(Thinking(counted=True))
    # the model service's last count (its text and thinking), and the text received after it
    assert final.output_tokens == 1200 + load_cl100k().count(AFTER)


async def test_a_call_left_in_a_tool_calls_arguments_bills_them() -> None:
    final = await _left_while_writing(WritingATool())
    assert final.output_tokens == 900  # the model service's count: the text and the pieces


async def test_an_older_model_services_uncounted_progress_bills_the_routers_count() -> None:
    final = await _left_while_writing(Thinking(counted=False))
    tokenizer = load_cl100k()
    assert final.output_tokens == tokenizer.count(LEAD + AFTER)
