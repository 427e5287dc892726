"""A model call's open call: the bill the billing outbox journals while the call runs.

A router killed mid-call (SIGKILL, OOM, a host crash) unwinds no handler: the calls it had in
flight, whose replicas had prefilled (and a provider bills) their prompts, would get no FINAL.
With a journal (``ROUTER_DATA_DIR``), each call is journalled as it starts, before its WARM
commit is sent (the WARM waits until the line is in the file, not for its fsync): its WARM as
it is sent (by the Plan's ``plan_id``; none when there was no Plan, as that WARM carries the
request) and its FINAL as prefix-cache would estimate it, with the output tokens counted so
far, counted again at a chunk once ``UPDATE_EVERY_S`` has passed since the last count (at
most that long's output goes unbilled; a call shorter than that is two lines, opened and
settled); a ``progress`` chunk's running count (the model's thinking, a tool call's pieces) is
journalled with it, the larger count kept. When prefix-cache does
not acknowledge the WARM, the open call is rewritten once with the WARM as a replay sends it
(the request, the Plan's read and time: the Plan may be gone by the time prefix-cache is back)
and is not rewritten after (its output count stays the one of then). The call's own FINAL, or
its outbox entry, settles it; the next router's start bills what a killed one left (``outbox.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.output_count import streamed_output_tokens
from services.router.outbox import BillingOutbox

# The output count is journalled at most once a second: a bounded loss for a long answer, and
# no line for a short one (each line costs the journal's thread a serialization and a write:
# counted at 1, 2, 4, 8 and 16 chunks, the open calls made the router's CPU per miss a sixth
# higher).
UPDATE_EVERY_S = 1.0


class OpenCall:
    """One model call's open call. ``count``: the output tokens of a piece of its answer;
    ``clock``: seconds, monotonic (the pipeline's)."""

    def __init__(
        self, outbox: BillingOutbox | None, count: Callable[[str], int], clock: Callable[[], float]
    ) -> None:
        self._outbox = outbox
        self._count = count
        self._clock = clock
        self.entry: str | None = None  # its journal entry, until settled (None: not journalled)
        self._warm: pc.CommitRequest | None = None
        self._final = pc.CommitRequest()  # its output tokens are ``_output_tokens``
        self._carries_request = False  # rewritten with the request: not rewritten again
        self._next_update = clock() + UPDATE_EVERY_S
        self._output_tokens = 0  # counted up to the last update
        self._uncounted: list[str] = []  # the pieces produced since
        # the non-empty pieces produced, and those after the last running count: each at
        # least a token (``streamed_output_tokens``)
        self._pieces = 0
        self._pieces_after_report = 0
        # the model service's last running count (a ``progress`` chunk's: its thinking and a
        # tool call's pieces in it) and the output counted after it, up to the last update
        self._reported = 0
        self._after_report = 0
        self._uncounted_after_report: list[str] = []
        self._ended = False  # settled: nothing more is journalled

    def open(self, warm: pc.CommitRequest | None, final: pc.CommitRequest) -> asyncio.Future[None]:
        """At the call's start: ``warm`` as it will be sent (None: it carries the request),
        ``final`` with 0 output tokens. The future is set once the line is in the file (at
        once without a journal; a failed write is logged, and sets it too)."""
        self._warm, self._final = warm, final
        return self._write()

    def warm_lost(self, replay_warm: pc.CommitRequest) -> None:
        """Prefix-cache did not acknowledge the WARM: the open call carries it as a replay
        sends it (with the request), rewritten now and not after."""
        if self.entry is None:
            return
        self._warm, self._carries_request = replay_warm, True
        self._count_output()
        self._write()

    def produced(self, piece: str, *, after_count: bool = True) -> None:
        """A chunk of the answer (its text, or a tool call's name and input). ``after_count``:
        it is output the model service's last running count does not hold (text after that
        ``progress`` chunk; not a whole tool call, whose pieces that count holds), as
        ``Answer.add``."""
        if self.entry is None or self._ended or self._carries_request:
            return  # not journalled (no journal, or settled), or not rewritten
        self._uncounted.append(piece)
        self._pieces += bool(piece)
        if self._reported and after_count:
            self._uncounted_after_report.append(piece)
            self._pieces_after_report += bool(piece)
        self._update()

    def progressed(self, output_tokens: int) -> None:
        """A ``progress`` chunk: the model service's running count of what the model wrote
        (0: an older model service's, none), its thinking and a tool call's pieces in it,
        which ``produced`` never sees (a model thinking for minutes sends nothing else)."""
        if self.entry is None or self._ended or self._carries_request:
            return
        if output_tokens:
            self._reported = output_tokens
            self._after_report = self._pieces_after_report = 0
            self._uncounted_after_report.clear()
        self._update()

    def _update(self) -> None:
        if self._clock() < self._next_update:
            return
        self._count_output()
        self._write()

    def answered(self, final: pc.CommitRequest) -> asyncio.Future[None]:
        """The whole answer goes out before its ``final`` (its whole output count, and the
        provider's report) was answered: the open call carries it, rewritten now, so that a
        router killed before that reply, or its host crashed, has the answer billed whole at
        its next start, as the outbox would have kept it. The future is set once the line is
        fsynced (as the outbox's keep), or failed with the sync."""
        if self._ended:
            return self._write()  # (settled: nothing is written)
        self._final = final
        self._output_tokens, self._reported, self._after_report = final.output_tokens, 0, 0
        self._pieces = self._pieces_after_report = 0  # its bill counted them, or was reported
        self._uncounted.clear()
        self._uncounted_after_report.clear()
        return self._write(durable=True)

    def settled(self, *, final_made: bool) -> None:
        """The call's FINAL was made (``final_made``: the entry is done), or its outbox entry
        replaced the open call (or could not be written, by the answer nor by the call's bill
        without it, which tries after: a replay bills the open call)."""
        self._ended = True
        if self._outbox is None or self.entry is None:
            return
        if final_made:
            self._outbox.settle(self.entry)
        else:
            self._outbox.release(self.entry)
        self.entry = None

    def _count_output(self) -> None:
        if self._uncounted:
            self._output_tokens += self._count("".join(self._uncounted))
            self._uncounted.clear()
        if self._uncounted_after_report:
            self._after_report += self._count("".join(self._uncounted_after_report))
            self._uncounted_after_report.clear()
        self._next_update = self._clock() + UPDATE_EVERY_S

    def _write(self, *, durable: bool = False) -> asyncio.Future[None]:
        opened = None
        if self._outbox is not None and not self._ended:
            final = pc.CommitRequest()
            final.CopyFrom(self._final)  # a copy: the journal's thread serializes it
            # the larger of the router's count and the model service's (with what came after),
            # each non-empty piece at least a token: a whitespace runaway's 1,281 pieces were
            # journalled our count of their text, 325
            final.output_tokens = max(
                streamed_output_tokens(self._output_tokens, self._pieces),
                self._reported
                + streamed_output_tokens(self._after_report, self._pieces_after_report),
            )
            commits = [final] if self._warm is None else [self._warm, final]
            opened = self._outbox.open(commits, self.entry, durable=durable)
        if opened is None:
            written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            written.set_result(None)
            return written
        self.entry, written = opened
        return written
