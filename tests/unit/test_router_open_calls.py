"""Open calls: with a journal, the billing outbox journals each model call's WARM and FINAL
before its WARM is sent, and its output as its chunks grow; the call's own FINAL settles it.
A router killed mid-call unwinds nothing, so its next start bills what the journal holds (a
replay of this process leaves its own running calls alone). Against fakes of prefix-cache and
the models.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code
from services.model.providers.progress import Progress, tool_use_chunk
from services.router.dependencies import CallFailed
from services.router.open_calls import UPDATE_EVERY_S
from services.router.outbox import BillingOutbox
from services.router.outbox_budgets import OpenCallBill
from services.router.outbox_journal import JOURNAL_NAME, Journal
from tests.unit.test_router_pipeline import (
    TOKENIZER,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeStream,
    Rig,
)
from tests.unit.test_router_pipeline import _request as _pipeline_request

CHUNKS_APART_S = 0.3
PIECES = ["Tides rise ", "and fall ", "twice a day ", "as the Moon ", "pulls the sea "]


class Writing(FakeStream):
    """Its chunks, then still writing (it never ends: the router is killed meanwhile); each
    chunk ``apart_s`` after the last on ``clock``."""

    def __init__(
        self, chunks: list[model_pb2.GenerateChunk | CallFailed], clock: FakeClock | None
    ) -> None:
        super().__init__(chunks)
        self.clock = clock

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self.clock is not None:
            self.clock.now += CHUNKS_APART_S
        chunk = await super().read()
        if chunk is None:
            await asyncio.Event().wait()
        return chunk


@dataclass
class WritingModels(FakeModels):
    pieces: list[str] = field(default_factory=lambda: list(PIECES))

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
        chunks: list[model_pb2.GenerateChunk | CallFailed] = [
            model_pb2.GenerateChunk(start=start),
            *self.before_text(),
            *(model_pb2.GenerateChunk(text=piece) for piece in self.pieces),
        ]
        return Writing(chunks, self.clock)

    def before_text(self) -> list[model_pb2.GenerateChunk]:
        return []


def _restarted(directory: Path, copy: Path) -> Journal:
    """The journal a router starting now would load (a copy: the killed router's process is
    this test's, and still holds the directory's lock)."""
    copy.mkdir()
    shutil.copyfile(directory / JOURNAL_NAME, copy / JOURNAL_NAME)
    return Journal(copy)


async def test_a_call_running_when_the_router_is_killed_is_billed_at_its_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = FakePrefix()
    wall = ManualClock()
    started_ms = wall.now_ms()
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01, wall=wall)
    clock = FakeClock()
    rig = Rig(prefix=prefix, outbox=outbox, models=WritingModels(clock=clock), clock=clock)
    pipeline = rig.pipeline()
    deltas = 0
    async with contextlib.aclosing(pipeline.run("tenant-a", _pipeline_request())) as run:
        async for chunk in run:
            deltas += chunk.WhichOneof("part") == "delta"
            wall.advance(s=CHUNKS_APART_S)  # its output's rewrites come later
            if deltas == len(PIECES):
                break
        # the journal's writes so far are done (a flush's calls queue behind them), and a
        # replay round leaves this process's running call alone
        assert await outbox.flush() == 0 and outbox.pending == 0
        assert [c.phase for c in prefix.commits] == [pc.COMMIT_PHASE_WARM]
        warm = prefix.commits[0]
        # the router is killed now: no FINAL, no handler unwinds
        journal = _restarted(tmp_path / "data", tmp_path / "restarted")
    await pipeline.drain()  # (the test's own router: its bill of the cancelled call)

    settled: list[int] = []
    billed: list[OpenCallBill] = []
    corrected: list[tuple[str, int]] = []
    again = FakePrefix()
    with caplog.at_level(logging.INFO, "cachemesh.router.outbox"):
        restarted = BillingOutbox(
            again,
            journal,
            1.0,
            0.01,
            open_calls_settled=settled.append,
            open_call_billed=billed.append,
            cost_corrected=lambda tenant, nanos: corrected.append((tenant, nanos)),
        )
        assert restarted.pending == 1
        assert await restarted.flush() == 1
    # its WARM as it was sent (a no-op if it landed, made by its Plan if not), then its FINAL
    assert [(c.request_id, c.phase) for c in again.commits] == [
        (warm.request_id, pc.COMMIT_PHASE_WARM),
        (warm.request_id, pc.COMMIT_PHASE_FINAL),
    ]
    assert again.commits[0] == warm and not warm.HasField("request")  # by its plan_id
    final = again.commits[1]
    # the output journalled once a second: at the fourth piece (1.2 s after the start, which
    # came 0.3 s after the call opened), the fifth not yet
    assert UPDATE_EVERY_S == 1.0
    counted = ["".join(PIECES[:4])]
    assert final.output_tokens == sum(TOKENIZER.count(piece) for piece in counted)
    assert (final.tenant, final.model, final.replica) == ("tenant-a", "sim-large", warm.replica)
    assert settled == [1]
    # its tenant and its cost, for the tenant's budgets (before: counted against none), and
    # when it started (its budget periods: not those of this start)
    assert billed == [OpenCallBill("tenant-a", 123, started_ms)]
    # and for the router's cost counters, which the killed process never counted it in
    assert corrected == [("tenant-a", 123)]
    said = [r.getMessage() for r in caplog.records]
    assert any("1 model calls were still running" in line for line in said), said
    assert any("billed 1 open calls" in line for line in said), said
    assert not any("Tides" in line or "password" in line for line in said)  # no prompt text
    assert (tmp_path / "restarted" / JOURNAL_NAME).read_text() == ""
    journal.close()


@dataclass
class JournalReadingPrefix(FakePrefix):
    """Reads the journal's file as each WARM commit arrives (a router killed then would
    restart with what it holds)."""

    journal: Path = Path()
    seen: list[set[str]] = field(default_factory=list)  # the open calls' keys, each WARM

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_WARM:
            keys = set()
            for line in (self.journal / JOURNAL_NAME).read_text().splitlines():
                record = json.loads(line)
                if record.get("open"):
                    final = pc.CommitRequest.FromString(base64.b64decode(record["commits"][-1]))
                    keys.add(final.request_id)
            self.seen.append(keys)
        return await super().commit(request, deadline_s)


async def test_the_open_call_is_in_the_journal_before_the_warm_is_sent(tmp_path: Path) -> None:
    """A WARM that lands must never outlive a killed router unjournalled: the open call's line
    is in the file (not yet fsynced: a process kill keeps it) before the WARM goes out."""
    prefix = JournalReadingPrefix(journal=tmp_path)
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await Rig(prefix=prefix, outbox=outbox).run(_pipeline_request())
    warm = prefix.commits[0]
    assert warm.phase == pc.COMMIT_PHASE_WARM and prefix.seen == [{warm.request_id}]


async def test_a_call_that_ends_settles_its_open_call(tmp_path: Path) -> None:
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    chunks = await Rig(prefix=prefix, outbox=outbox).run(_pipeline_request())
    assert not chunks[-1].end.cost.estimated
    assert await outbox.flush() == 0  # after the journal's writes
    assert [c.phase for c in prefix.commits] == [pc.COMMIT_PHASE_WARM, pc.COMMIT_PHASE_FINAL]
    assert (tmp_path / JOURNAL_NAME).read_text() == ""  # settled: nothing left to bill


async def test_with_prefix_cache_down_the_answers_outbox_entry_replaces_its_open_call(
    tmp_path: Path,
) -> None:
    """The WARM was not acknowledged: the open call carries it (with the request); then the
    answer's outbox entry takes its place, once, as an ordinary entry (no estimate of a kill)."""
    prefix = FakePrefix(down=True)
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01)
    chunks = await Rig(prefix=prefix, outbox=outbox).run(_pipeline_request())
    assert chunks[-1].end.cost.estimated and outbox.pending == 1
    journal = _restarted(tmp_path / "data", tmp_path / "restarted")
    settled: list[int] = []
    restarted = BillingOutbox(FakePrefix(), journal, 1.0, 0.01, open_calls_settled=settled.append)
    assert journal.opened() == [] and restarted.pending == 1
    warm, final = journal.read(journal.pending()[0])
    assert warm.phase == pc.COMMIT_PHASE_WARM and warm.request.messages
    assert final.output_tokens == 3  # the answer's, not an open call's
    assert await restarted.flush() == 1 and settled == []
    journal.close()


def _open_commits(key: str) -> list[pc.CommitRequest]:
    return [pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_FINAL)]


@dataclass
class Prefix:
    refuse: Code | None = None
    sent: list[str] = field(default_factory=list)

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        raise AssertionError("the outbox never plans")

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if self.refuse is not None:
            raise CallFailed(self.refuse, "no")
        self.sent.append(request.request_id)
        return pc.CommitResponse()


async def test_an_open_call_released_by_its_call_is_billed_by_the_next_round(
    tmp_path: Path,
) -> None:
    """A call whose bill could not be kept (its outbox entry not written) releases its open
    call: the next round bills it as journalled, and counts it."""
    prefix, settled = Prefix(), list[int]()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01, open_calls_settled=settled.append)
    opened = outbox.open(_open_commits("a#1"))
    assert opened is not None
    entry, written = opened
    await written
    rewritten = outbox.open(_open_commits("a#1"), entry)
    assert rewritten is not None and rewritten[0] == entry
    assert await outbox.flush() == 0 and prefix.sent == []
    outbox.release(entry)
    assert outbox.pending == 1 and await outbox.flush() == 1
    assert prefix.sent == ["a#1"] and settled == [1]
    assert outbox.open(_open_commits("a#1"), entry) is None  # settled: not written again
    assert await outbox.flush() == 0 and (tmp_path / JOURNAL_NAME).read_text() == ""


async def test_a_killed_routers_open_call_refused_for_good_is_dropped_uncounted(
    tmp_path: Path,
) -> None:
    """Its WARM is gone (expired, or lost with a prefix-cache in memory): nothing to bill."""
    first = BillingOutbox(Prefix(), Journal(tmp_path / "data"), 1.0, 0.01)
    first.open(_open_commits("a#1"))
    await first.flush()  # after the open call's write
    settled: list[int] = []
    journal = _restarted(tmp_path / "data", tmp_path / "restarted")
    prefix = Prefix(refuse=Code.FAILED_PRECONDITION)
    again = BillingOutbox(prefix, journal, 1.0, 0.01, open_calls_settled=settled.append)
    assert await again.flush() == 0 and again.pending == 0 and settled == []  # none billed
    journal.close()


def test_without_a_journal_nothing_is_opened() -> None:
    assert BillingOutbox(Prefix(), None, 1.0, 0.01).open(_open_commits("a#1")) is None


async def test_an_open_call_whose_plan_prefix_cache_lost_is_counted_dropped_not_billed(
    tmp_path: Path,
) -> None:
    """A killed router's open call names its WARM by the Plan's id: a prefix-cache that lost
    the Plan (restarted with its state in memory) refuses it for good, and the call cannot be
    billed. The replay says so: dropped, not settled, and no open call counted billed."""
    journal = Journal(tmp_path)
    journal.load()
    warm = pc.CommitRequest(
        tenant="tenant-a", request_id="r#1", model="sim-large", phase=pc.COMMIT_PHASE_WARM,
        plan_id="p-gone", replica="large-1",
    )  # fmt: skip
    final = pc.CommitRequest(
        tenant="tenant-a", request_id="r#1", model="sim-large", phase=pc.COMMIT_PHASE_FINAL,
    )  # fmt: skip
    journal.add("r", [warm, final], None, open_call=True)
    journal.sync()

    class PlanGone(FakePrefix):
        async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
            raise CallFailed(Code.FAILED_PRECONDITION, "plan_id 'p-gone' is not held")

    settled: list[int] = []
    dropped: list[int] = []
    outbox = BillingOutbox(
        PlanGone(), journal, 1.0, 0.01, open_calls_settled=settled.append, dropped=dropped.append
    )
    assert await outbox.flush() == 0
    assert (settled, dropped, outbox.pending) == ([], [1], 0)
    journal.close()


@dataclass
class ThinkingModels(WritingModels):
    """Thinks first (``progress`` chunks with the model service's running count), then writes
    ``pieces``; never ends."""

    counts: list[int] = field(default_factory=lambda: [120, 260, 410])

    def before_text(self) -> list[model_pb2.GenerateChunk]:
        return [
            model_pb2.GenerateChunk(progress=model_pb2.GenerateProgress(output_tokens=n))
            for n in self.counts
        ]


async def test_a_killed_routers_open_call_bills_the_thinking_the_model_service_counted(
    tmp_path: Path,
) -> None:
    # before: the open call counted only the text the router received (4 tokens), never the
    # 410 tokens of thinking before them, which the provider bills
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01, wall=ManualClock())
    clock = FakeClock()
    rig = Rig(prefix=prefix, outbox=outbox, models=ThinkingModels(clock=clock), clock=clock)
    pipeline = rig.pipeline()
    deltas = 0
    async with contextlib.aclosing(pipeline.run("tenant-a", _pipeline_request())) as run:
        async for chunk in run:
            deltas += chunk.WhichOneof("part") == "delta"
            if deltas == 4:
                break
        assert await outbox.flush() == 0
        journal = _restarted(tmp_path / "data", tmp_path / "restarted")
    await pipeline.drain()

    again = FakePrefix()
    restarted = BillingOutbox(again, journal, 1.0, 0.01)
    assert await restarted.flush() == 1
    final = again.commits[-1]
    assert final.phase == pc.COMMIT_PHASE_FINAL
    # journalled at the first chunk a second after the call opened (its first piece of text,
    # the thinking's last count before it), and at the fifth piece, a second later: the
    # router reads the model's chunks as they come, though its caller took four
    # (``read_ahead``): the count, and the text after it
    after = TOKENIZER.count(PIECES[0]) + TOKENIZER.count("".join(PIECES[1:]))
    assert final.output_tokens == 410 + after
    journal.close()


TOOL_ARGS = json.dumps({"city": "Paris", "notes": " ".join(f"word{i}" for i in range(120))})


@dataclass
class ToolModels(WritingModels):
    """A tool call streamed in pieces (``progress`` chunks with the running count), then the
    whole call as a block 1.2 s later (a provider that closed it late); never ends."""

    reported: int = 0

    def before_text(self) -> list[model_pb2.GenerateChunk]:
        progress = Progress("small-1", "simulated", 40, count=TOKENIZER.count)
        pieces = [TOOL_ARGS[i : i + 80] for i in range(0, len(TOOL_ARGS), 80)]
        chunks = [progress.tool_piece(piece) for piece in ["get_weather", *pieces]]
        self.reported = chunks[-1].progress.output_tokens
        return [*chunks, tool_use_chunk("call_1", "get_weather", TOOL_ARGS)]

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        stream = super().generate(replica, request, deadline_s)
        assert isinstance(stream, Writing)
        read = stream.read

        async def late_block() -> model_pb2.GenerateChunk | None:
            chunk = await read()
            if chunk is not None and chunk.WhichOneof("part") == "block" and self.clock:
                self.clock.now += 1.2
            return chunk

        stream.read = late_block  # type: ignore[method-assign]
        return stream


async def test_a_killed_routers_open_call_bills_a_tool_call_once(tmp_path: Path) -> None:
    # before: the whole tool call was added after the running count that held its pieces
    # already (507 output tokens journalled for a tool call of 253)
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01, wall=ManualClock())
    clock = FakeClock()
    models = ToolModels(clock=clock, pieces=[])
    rig = Rig(prefix=prefix, outbox=outbox, models=models, clock=clock)
    pipeline = rig.pipeline()
    async with contextlib.aclosing(pipeline.run("tenant-a", _pipeline_request())) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the tool call reached the client; the router is killed now
        assert await outbox.flush() == 0
        journal = _restarted(tmp_path / "data", tmp_path / "restarted")
    await pipeline.drain()

    again = FakePrefix()
    assert await BillingOutbox(again, journal, 1.0, 0.01).flush() == 1
    final = again.commits[-1]
    assert final.phase == pc.COMMIT_PHASE_FINAL
    whole = TOKENIZER.count("get_weather" + TOOL_ARGS)  # the router's own count of the block
    assert final.output_tokens == max(whole, models.reported)
    journal.close()
