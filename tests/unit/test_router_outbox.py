"""The billing outbox against a fake prefix-cache port: kept durably, replayed in order until
acknowledged, a torn journal line ignored, a final refusal dropped."""

from __future__ import annotations

from pathlib import Path

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


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0, stable_after_s=30.0)
    assert [backoff.after_exit(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.after_exit(31.0) == 0.5
