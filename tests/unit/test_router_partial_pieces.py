"""A call that ends before the model's end reaches the router (its caller left, or the router
cut it) is billed the larger of our count of what it wrote and the non-empty pieces it was
streamed in: each piece a provider streams is at least one of its tokens. A JSON-mode runaway
of whitespace, 32 spaces a piece, counts a few tokens by our tokenizer (1,281 pieces: 325) but
is a token a piece at the provider. The model service bills its own cut that way (c554753);
the router's partial bill counted the text alone, and so did the model service's running count
(the ``progress`` chunks), on which the router's bill of a thinking model's answer rests."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.tokens import load_tokenizers
from services.model.providers.progress import Progress
from services.router.dependencies import CallFailed
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from tests.unit.test_router_open_calls import WritingModels, _restarted
from tests.unit.test_router_partial_billing import Held
from tests.unit.test_router_pipeline import (
    REPLICAS,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeStream,
    Rig,
)
from tests.unit.test_router_pipeline import _request as _pipeline_request
from tests.waits import reached

TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())
MINI = TABLE.models["gpt-4o-mini"]
SPACES = " " * 32  # a JSON-mode runaway's piece
RUNAWAY = ['{"a": 1', *[SPACES] * 1280]  # 1,281 pieces; o200k counts their text 325
SHORT = RUNAWAY[:121]


def _progress(output_tokens: int) -> model_pb2.GenerateChunk:
    return model_pb2.GenerateChunk(progress=model_pb2.GenerateProgress(output_tokens=output_tokens))


class Runaway(FakeModels):
    """A start, ``before`` (progress chunks), the runaway's pieces (and an empty piece: the
    model service's chunk of a character's held half, no token), then nothing yet."""

    def __init__(self, before: list[model_pb2.GenerateChunk]) -> None:
        super().__init__()
        self.before = before
        self.waiting = asyncio.Event()

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
        chunks: list[model_pb2.GenerateChunk | CallFailed] = [
            model_pb2.GenerateChunk(start=start),
            *self.before,
            *(model_pb2.GenerateChunk(text=piece) for piece in RUNAWAY),
            model_pb2.GenerateChunk(text=""),
        ]
        held = Held(chunks)
        held.waiting = self.waiting
        return held


async def _left(models: Runaway) -> pc.CommitRequest:
    """The caller leaves once the router has read all the model sent so far; the FINAL."""
    rig = Rig(
        models=models, replicas={**REPLICAS, "gpt-4o-mini": ("openai-1",)}, tokenizers=TOKENIZERS
    )
    pipeline = rig.pipeline()
    deltas: list[pb.CompleteChunk] = []

    async def consume() -> None:
        request = build_request("Reply in JSON.", model="gpt-4o-mini", request_id="r1")
        async for chunk in pipeline.run("tenant-a", request):
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


async def test_a_whitespace_runaway_left_midway_bills_its_pieces() -> None:
    final = await _left(Runaway(before=[]))
    # was our count of its text, 325 output tokens: 195,000 nanos at gpt-4o-mini's 600
    assert final.output_tokens == len(RUNAWAY) == 1281
    assert final.output_tokens * MINI.rates(0).output_nanos == 768_600


async def test_a_runaway_after_the_model_services_count_bills_the_pieces_after_it() -> None:
    final = await _left(Runaway(before=[_progress(40)]))  # its thinking, counted 40
    assert final.output_tokens == 40 + 1281  # was 40 + 325


def test_the_running_count_of_a_whitespace_runaway_counts_its_pieces() -> None:
    """The ``progress`` chunks' count (what the router bills a call it cuts or its caller
    leaves while the model thinks or writes a tool call): its non-empty pieces when more."""
    count = TOKENIZERS.for_spec(MINI).count
    thinking, tool = (
        Progress("r1", "openai", 10, count=count),
        Progress("r1", "openai", 10, count=count),
    )
    for piece in RUNAWAY:
        last_thinking = thinking.reasoning(piece)
        last_tool = tool.tool_piece(piece)
    assert thinking.reasoning("").progress.output_tokens == 1281  # an empty piece: no token
    assert last_thinking.progress.output_tokens == 1281  # was 325
    assert last_tool.progress.output_tokens == 1281
    # the count a provider's end without an output count is given (its adapter's)
    assert thinking.output_tokens() == 1281


async def test_a_killed_routers_open_call_journals_a_runaways_pieces(tmp_path: Path) -> None:
    """The open call (a router killed mid-call is billed by its next start from it) counted
    the text alone too: 121 pieces (36 s of them, 0.3 s apart) journalled as 31."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01, wall=ManualClock())
    clock = FakeClock()
    rig = Rig(
        prefix=prefix, outbox=outbox, models=WritingModels(clock=clock, pieces=SHORT), clock=clock
    )
    pipeline = rig.pipeline()
    deltas = 0
    async with contextlib.aclosing(pipeline.run("tenant-a", _pipeline_request())) as run:
        async for chunk in run:
            deltas += chunk.WhichOneof("part") == "delta"
            if deltas == len(SHORT):
                break
        assert await outbox.flush() == 0
        journal = _restarted(tmp_path / "data", tmp_path / "restarted")  # killed now
    await pipeline.drain()

    again = FakePrefix()
    assert await BillingOutbox(again, journal, 1.0, 0.01).flush() == 1
    final = again.commits[-1]
    assert final.phase == pc.COMMIT_PHASE_FINAL
    # journalled once a second (a piece each 0.3 s): the pieces up to its last count
    assert len(SHORT) - 4 <= final.output_tokens <= len(SHORT)
    journal.close()
