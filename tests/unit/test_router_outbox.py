"""The billing outbox against a fake prefix-cache port: kept durably, replayed in order until
acknowledged, a torn journal line ignored, a final refusal dropped, any other kept."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.router.dependencies import CallFailed
from services.router.outbox import JOURNAL_NAME, BillingOutbox, Journal
from services.tools.stack.supervisor import Backoff


class FakePrefix:
    def __init__(self) -> None:
        self.down = True
        self.refuse: Code | None = None
        self.sent: list[tuple[str, int]] = []

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        raise AssertionError("the outbox never plans")

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if self.down:
            raise CallFailed(Code.UNAVAILABLE, "down")
        if self.refuse is not None:
            raise CallFailed(self.refuse, "no")
        self.sent.append((request.request_id, request.phase))
        return pc.CommitResponse()


def _commits(key: str) -> list[pc.CommitRequest]:
    return [
        pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_WARM),
        pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_FINAL),
    ]


async def test_kept_until_prefix_cache_is_back_then_billed_in_order(tmp_path: Path) -> None:
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    assert await outbox.flush() == 0 and outbox.pending == 2
    # a router that died now replays its journal when it starts again
    again = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    assert again.pending == 2
    prefix.down = False
    assert await again.flush() == 2 and again.pending == 0
    warm, final = pc.COMMIT_PHASE_WARM, pc.COMMIT_PHASE_FINAL
    assert prefix.sent == [("a#1", warm), ("a#1", final), ("b#1", warm), ("b#1", final)]
    assert (tmp_path / JOURNAL_NAME).read_text() == ""  # emptied once nothing is pending
    assert BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01).pending == 0


async def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    outbox = BillingOutbox(FakePrefix(), Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    with (tmp_path / JOURNAL_NAME).open("a") as handle:
        handle.write('{"add": "x", "commits": ["AAA')  # the crash came mid-append
    assert BillingOutbox(FakePrefix(), Journal(tmp_path), 1.0, 0.01).pending == 1


async def test_a_final_refusal_is_dropped_not_retried_forever(tmp_path: Path) -> None:
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    prefix.down, prefix.refuse = False, Code.INVALID_ARGUMENT
    assert await outbox.flush() == 1 and outbox.pending == 0


@pytest.mark.parametrize(
    "code",
    [Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.INTERNAL, Code.RESOURCE_EXHAUSTED],
)
async def test_a_refusal_that_may_pass_keeps_the_entry(tmp_path: Path, code: Code) -> None:
    """E.g. the internal token rejected during a rotation: billing is kept, not dropped."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    prefix.down, prefix.refuse = False, code
    assert await outbox.flush() == 0 and outbox.pending == 1
    prefix.refuse = None
    assert await outbox.flush() == 1 and prefix.sent[-1] == ("a#1", pc.COMMIT_PHASE_FINAL)


async def test_an_entry_refused_for_now_does_not_hold_back_the_ones_after_it(
    tmp_path: Path,
) -> None:
    class OneBad(FakePrefix):
        async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
            if request.request_id == "a#1":
                raise CallFailed(Code.INTERNAL, "a bug on this one")
            return await super().commit(request, deadline_s)

    prefix = OneBad()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    await outbox.keep(_commits("b#1"))
    prefix.down = False
    assert await outbox.flush() == 1 and outbox.pending == 1  # b billed, a kept
    assert [rid for rid, _ in prefix.sent] == ["b#1", "b#1"]


class SlowJournal(Journal):
    def append(self, record: dict[str, object]) -> None:
        super().append(record)  # written and fsynced ...
        time.sleep(0.05)  # ... and the thread returns a little later (a slow disk)


class SlowPrefix(FakePrefix):
    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        await asyncio.sleep(0.01)
        return await super().commit(request, deadline_s)


async def test_an_entry_kept_while_the_last_one_settles_stays_in_the_journal(
    tmp_path: Path,
) -> None:
    """The flush that settles the last pending entry empties the journal; an entry whose line
    was appended meanwhile must survive it (it was fsynced before its answer went out)."""
    prefix = SlowPrefix()
    outbox = BillingOutbox(prefix, SlowJournal(tmp_path), 1.0, 0.01)
    await outbox.keep(_commits("a#1"))
    prefix.down = False
    flush = asyncio.ensure_future(outbox.flush())
    await asyncio.sleep(0.005)
    await outbox.keep(_commits("b#1"))  # deferred while a#1 is being billed
    await flush
    assert outbox.pending == 1
    assert [e.commits[0].request_id for e in Journal(tmp_path).load()] == ["b#1"]


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0, stable_after_s=30.0)
    assert [backoff.after_exit(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.after_exit(31.0) == 0.5
