"""The billing outbox: the commits of answers served while prefix-cache could not take them.

An answer whose FINAL commit prefix-cache did not acknowledge (it was down, restarting, or its
Redis was) is still served, marked ``cost.estimated``; its commits — a WARM carrying the
request (no cache read claimed when the first WARM failed too: the answer was priced without
one) and the FINAL — are appended to the journal (``<ROUTER_DATA_DIR>/billing-outbox.jsonl``,
fsynced) before the answer goes out, and replayed in order every ``ROUTER_OUTBOX_RETRY_S``
until prefix-cache acknowledges them. Both commits are idempotent by their key (the request id
and the attempt), so a replay that raced an earlier one bills once. A router that dies replays
its journal when it starts again. The commits wait on disk, not in memory (the journal keeps
only the ids of its entries: ``outbox_journal.py``), and the answers kept together share one
fsync. Without a data directory the outbox is in memory only (lost with the router; said once
at start) and bounded: once the commits it holds exceed ``ROUTER_OUTBOX_MAX_BYTES`` it is
``full``, and the pipeline refuses the requests that need a model call (``UNAVAILABLE``,
before the model is called) until replays bring it back under the bound. Nothing kept is ever
dropped: an answer already produced is still kept (the bound is exceeded by at most the calls
in flight), so no answer goes out unbilled and no provider call is paid that cannot be billed.

A commit refused for the request's own fault (INVALID_ARGUMENT, FAILED_PRECONDITION: the WARM
expired) is logged at ERROR with its key and dropped: retrying cannot succeed; but a FINAL
refused for its provider's usage report is sent again without it, billed at prefix-cache's
estimate (``without_refused_report``). Any other
refusal (prefix-cache down or overloaded, an internal token rejected during a rotation, an
internal error) keeps the entry for the next round, logged at WARNING with its status: billing
is never dropped for a fault that may pass. So does a FAILED_PRECONDITION marked as the
prefix-cache replica's model table lacking the bill's model (``CallFailed.table_lacks_model``:
replicas of two tables on one Redis, a rolling deploy), the WARNING naming the model: a
replica whose table has it bills the entry.

Open calls: with a journal, each model call is journalled as an "open call" as it starts,
before its WARM commit is sent (``open``; the WARM waits until the line is in the file, not for
its fsync), with when it started (the wall clock's: the budget periods it counts in): the WARM
as it is sent and the FINAL that would bill the call as prefix-cache estimates it (the prompt
as the WARM prices it, the output tokens journalled so far), rewritten as its output grows
(``open_calls.py``). The call's FINAL settles it (``settle``), or its
outbox entry replaces it (``keep(replaces=...)``). A replay round leaves the open calls of
this process alone; a router that starts and finds open calls in its journal was killed
mid-call (SIGKILL, OOM, a host crash: no handler billed them), and replays them as it replays
any entry: each is billed at prefix-cache's estimate, idempotently (the WARM and FINAL are
first-wins by their key, so a FINAL that landed before the kill stands), counted in
``cachemesh_router_open_calls_settled_total``. Without a journal nothing is opened: a call in
flight when the router is killed stays unbilled (a WARM with no FINAL).

A full disk: a bill the journal cannot write (``ENOSPC``; the answer's, or a call's billed
without its answer) is ``held`` in memory rather than dropped, its answer refused as after a
failed fsync (``JournalError``, ``written``: billed if the router lives); each replay round
sends it as any entry and, while the journal fails, first tries to write it into the journal
(``retry_held``). While the journal fails and prefix-cache takes no bill (``cannot_keep``), or
the bills held exceed ``max_memory_bytes``, the pipeline calls no model (its bill could be
neither sent nor kept durably); held bills the router stops with are logged at ERROR with their
tenant and estimate, and counted as ``dropped``.

What the outbox tells the tenants' budgets and the router's cost counters of the bills it
keeps and replays (each kept bill's estimate, counted as its line is written; each replayed
bill's correction or cost, told on the first reply to its FINAL, a ``repeated`` one of an entry
this process kept included): ``outbox_budgets.py``.

Each entry's replay joins the trace of the request it bills, recorded once for an outage of
prefix-cache however long (``outbox_replay``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

from opentelemetry import trace

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import Clock, MonotonicClock, SystemClock, Throttles, suppressed
from services.router.dependencies import PrefixPort
from services.router.outbox_budgets import (
    BillCounts,
    CostCorrected,
    EstimateBilled,
    EstimateKept,
    OpenCallBill,
)
from services.router.outbox_entries import UNREADABLE, DiskEntries, MemoryEntries
from services.router.outbox_journal import Journal, UnreadableEntry
from services.router.outbox_replay import (
    KEPT_LOG_EVERY_MS,
    PROPAGATOR,
    BilledLayer,
    PrefixServing,
    Replayer,
    Sent,
)

log = logging.getLogger("cachemesh.router.outbox")


class Backlog(NamedTuple):
    """The entries the billing outbox keeps, and the age of the oldest in seconds."""

    pending: int
    oldest_age_s: float


class BillingOutbox:
    def __init__(
        self,
        prefix: PrefixPort,
        journal: Journal | None,
        deadline_s: float,
        retry_s: float,
        tracer: trace.Tracer | None = None,
        max_memory_bytes: int | None = None,
        open_calls_settled: Callable[[int], None] | None = None,
        dropped: Callable[[int], None] | None = None,
        open_call_billed: Callable[[OpenCallBill], None] | None = None,
        wall: Clock | None = None,
        journal_sync_s: float | None = None,
        estimate_billed: EstimateBilled | None = None,
        journal_sync_failed: Callable[[int], None] | None = None,
        estimate_kept: EstimateKept | None = None,
        prefix_serving: PrefixServing | None = None,
        ages: Clock | None = None,
        billed_layer: BilledLayer | None = None,
        cost_corrected: CostCorrected | None = None,
    ) -> None:
        """``tracer``: the replays' spans (None: the global provider's). ``max_memory_bytes``:
        the bound of an outbox in memory (``full`` past it; None: unbounded); a journal's
        commits wait on disk and are not bounded by it, only the bills it could not write, held
        in memory (``cannot_keep`` past it). ``open_calls_settled``: told how many
        open calls a replay round billed (a killed router's, the metric); ``dropped``: how
        many entries prefix-cache refused for good (their bills lost, the metric);
        ``open_call_billed``: told of each open call billed (its tenant, cost and start; not
        when prefix-cache's reply to one an earlier process journalled is ``repeated``: its
        FINAL was made before, by the call or an earlier start's replay, which counted it): no
        request of this process counts it against the tenant's limits (the limiter's).
        ``wall``: when an open call starts, and when a kept answer's estimate was counted,
        journalled with them (the system clock's when None).
        ``journal_sync_s``: how long an open call's line may wait for its fsync
        (``JournalThread``'s ``sync_within_s``; None: until the next durable write).
        ``estimate_billed``: told of each kept answer billed, as ``(tenant, billed minus
        estimated nano-dollars, when the estimate was counted (ms), inherited=...)`` (the
        limiter's ``reconcile``; ``inherited``: the entry was in the journal when this process
        started, its estimate counted by an earlier one); not when the reply to an inherited
        entry is ``repeated`` (an earlier process's replay corrected it; of an entry this
        process kept, no reply came before: that one is told).
        ``journal_sync_failed``: told of each journal sync that could not make its writes
        durable (the metric; ``JournalThread``'s ``sync_failed``).
        ``estimate_kept``: told each kept bill's estimate as its line is written, as
        ``(tenant, nano-dollars, when it counts (ms))`` (the limiter's ``count_estimate``), and
        the estimate taken back (negative) when its entry is settled unreplayed.
        ``prefix_serving``: prefix-cache's health, asked before each try of an entry whose last
        try found it unreachable: the try is sent when it says SERVING, recorded (a replay span,
        its Commit calls sampled), else not sent this round (None: never asked, each such try
        sent unsampled). ``ages``: what the throttled log lines' intervals run on (None: a
        ``MonotonicClock``; never the wall, whose step back silenced them for its length).
        ``billed_layer``: the layer a replayed bill is served by, written on its replay span
        with the bill (None: the layer is left out).
        ``cost_corrected``: told each bill a replay made, on the reply ``estimate_billed`` or
        ``open_call_billed`` is told on, as ``(tenant, nano-dollars)``: a kept bill's cost
        minus its estimate, which the router's cost counters counted as it was kept (either
        sign); an open call's whole cost, which no counter counted (its router was killed, or
        its bill failed): the router's cost counters then sum to what was billed (the
        metrics' ``cost_corrected``)."""
        self._max_memory_bytes = max_memory_bytes
        self._said_full = False
        self._retry_s = retry_s
        self._lock = asyncio.Lock()  # one flush at a time
        self._open_calls_settled = open_calls_settled
        self._dropped = dropped
        self._wall = wall if wall is not None else SystemClock()
        # a log line's interval is this process's own: a step of the wall clock (NTP) must
        # not silence it for the step's length
        self._kept_log = Throttles(
            ages if ages is not None else MonotonicClock(), KEPT_LOG_EVERY_MS
        )
        self._replayer = Replayer(
            prefix,
            deadline_s,
            tracer if tracer is not None else trace.get_tracer("cachemesh.router"),
            self._kept_log,
            lambda: self.pending,
            prefix_serving,
            billed_layer,
        )
        # the open calls of this process's model calls running, and when each started
        self._live: dict[str, int] = {}
        # entries this process settled (their FINAL answered: the call's, or a replay's told)
        # whose "done" failed, maybe not run (no thread for its batch): if still pending, a
        # round does them again rather than send them (a repeat would be told as a first
        # reply lost)
        # (each with when it was first kept, for the age gauge: None when not known)
        self._undone: dict[str, int | None] = {}
        # prefix-cache did not take a bill (kept since), and no replay reached it since
        self._prefix_down = False
        self._entries: MemoryEntries | DiskEntries
        self._started_ms = self._wall.now_ms()  # the inherited entries' age counts from it
        inherited = journal.load() if journal is not None else ()
        # the entries' estimates and corrections, told to the budgets and the cost counters
        self._counts = BillCounts(
            self._wall,
            inherited,
            estimate_kept=estimate_kept,
            estimate_billed=estimate_billed,
            open_call_billed=open_call_billed,
            cost_corrected=cost_corrected,
        )
        if journal is not None:
            loaded = len(inherited)
            if opened := len(journal.opened()):
                log.warning(
                    "billing outbox: %d model calls were still running when this router's last "
                    "process ended without billing them (killed): each is billed now as "
                    "prefix-cache estimates it, its prompt as its WARM was priced and the "
                    "output tokens journalled before the kill",
                    opened,
                )
            if loaded - opened:
                log.info("billing outbox: %d answers to bill from the journal", loaded - opened)
            self._entries = DiskEntries(journal, journal_sync_s, journal_sync_failed)
        else:
            log.warning(
                "billing outbox in memory only (ROUTER_DATA_DIR unset): answers served while "
                "prefix-cache is down are lost from billing if the router dies before it is "
                "back, and the model calls running when it is killed are never billed"
            )
            self._entries = MemoryEntries()

    @property
    def pending(self) -> int:
        """The entries a replay round sends (not the open calls of model calls running). A
        running call's id is subtracted only if the entries hold it: its line may not be
        written yet (the journal's thread), or never (its write failed), and then it is not in
        ``count`` (subtracting it hid a kept bill from the gauges, the replay rounds' gate and
        ``cannot_keep``)."""
        entries = self._entries
        running = sum(1 for entry_id in self._live if entries.holds(entry_id))
        return max(entries.count - running, 0)

    def backlog(self) -> Backlog:
        """What the outbox keeps now, for the gauges (read on the loop, at each scrape): the
        ``pending`` entries and how long ago (the ``wall`` clock's seconds) the oldest was
        first kept, 0 with none. An entry an earlier process journalled counts from this
        process's start (its keep time is on disk, not read): a lower bound after a restart.
        The age follows the wall clock (a step back reads low, or 0). An entry whose "done"
        failed (``_undone``) is pending until a round writes it again, with the keep time it
        had (an open call never kept: its start)."""
        pending = self.pending
        if not pending:
            return Backlog(0, 0.0)
        now = self._wall.now_ms()
        kept = [self._counts.oldest_kept_ms(), *self._undone.values()]
        if self._counts.inherited_pending:
            kept.append(self._started_ms)
        oldest = min((at for at in kept if at is not None), default=None)
        age_ms = max(now - oldest, 0) if oldest is not None else 0
        return Backlog(pending, age_ms / 1000)

    def open(
        self,
        commits: Sequence[pc.CommitRequest],
        entry_id: str | None = None,
        *,
        durable: bool = False,
    ) -> tuple[str, asyncio.Future[None]] | None:
        """Journals the commits that bill a model call still running (its open call), or,
        with ``entry_id``, replaces that open call's (its output count grew). Returns the
        entry's id and a future set once its line is in the file (it then survives this
        process being killed; its fsync comes with its batch's, not waited for), or, when
        ``durable``, once fsynced (it then survives a host crash: the bill of an answer that
        goes before its FINAL answered, as the outbox keeps one); a write that fails is
        logged (the call is then billed as usual, unless the router is killed before it
        ends). None: no journal (nothing is opened), or the open call is settled already."""
        if not isinstance(self._entries, DiskEntries):
            return None
        rewrite = entry_id is not None
        if entry_id is None:
            entry_id = secrets.token_hex(8)
            self._live[entry_id] = self._wall.now_ms()  # its start, in each of its lines
        elif entry_id not in self._live:
            return None  # settled or released already: no longer the call's to rewrite
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        written = self._entries.open(
            entry_id, tuple(commits), carrier, self._live[entry_id], durable
        )
        # the first write's failure is said; a rewrite's leaves the line before it in place
        written.add_done_callback(_rewrite_failed if rewrite else self._open_failed)
        return entry_id, written

    def _open_failed(self, written: asyncio.Future[None]) -> None:
        """An open call not journalled: said once an interval, not once a model call (the
        journal's thread counts the write and says the disk's failure itself)."""
        if written.cancelled() or (exc := written.exception()) is None:
            return
        if due := self._kept_log.due("open", ""):
            log.warning(
                "billing outbox: journalling a running model call failed (%s): it is billed "
                "when it ends, but not if this router is killed before%s",
                exc,
                suppressed(due, KEPT_LOG_EVERY_MS),
            )

    def settle(self, entry_id: str) -> None:
        """The open call's FINAL was made: its entry is settled (not awaited: a replay of it
        would only find its FINAL made). If a bill kept in its place was written all the same
        (its keep cancelled, or failed, after its line went in), its estimate, counted then,
        is taken back: the FINAL's bill is counted instead."""
        if (started_ms := self._live.pop(entry_id, None)) is not None:
            kept_ms = self._counts.kept_at_ms(entry_id)
            self._counts.settled(entry_id)
            failed = partial(
                self._done_failed, entry_id, started_ms if kept_ms is None else kept_ms
            )
            self._entries.done(entry_id).add_done_callback(failed)

    def release(self, entry_id: str) -> None:
        """The open call is no longer this process's to settle: a replay round bills what its
        entry holds (its outbox entry, if ``keep`` replaced it; else its estimate)."""
        self._live.pop(entry_id, None)

    @property
    def full(self) -> bool:
        """An outbox in memory holding more than its bound: a new model call must not start
        (its answer could be kept only past the bound)."""
        entries, bound = self._entries, self._max_memory_bytes
        return (
            isinstance(entries, MemoryEntries) and bound is not None and entries.held_bytes > bound
        )

    @property
    def cannot_keep(self) -> bool:
        """The journal cannot write (a full or failing disk, not back since) while
        prefix-cache does not take bills (one was kept, is pending, and no replay reached
        prefix-cache since: a round each ``retry_s`` tries it, and the journal), or
        bills are held in memory for it past ``max_memory_bytes``: a new model call must not
        start (its bill could be neither sent nor kept durably; ``pipeline.py``)."""
        entries = self._entries
        if not isinstance(entries, DiskEntries):
            return False
        bound = self._max_memory_bytes
        if bound is not None and entries.held.held_bytes > bound:
            return True
        return entries.failing and self._prefix_down and self.pending > 0

    def _say_if_full(self) -> None:
        """One line when the outbox fills up, one when it is back under its bound."""
        full = self.full
        if full == self._said_full:
            return
        self._said_full = full
        if not full:
            log.info("billing outbox back under ROUTER_OUTBOX_MAX_BYTES: model calls resume")
            return
        assert isinstance(self._entries, MemoryEntries)
        log.error(
            "billing outbox in memory holds %d answers (%d bytes), over ROUTER_OUTBOX_MAX_BYTES "
            "(%d): requests that need a model call are refused (UNAVAILABLE) until "
            "prefix-cache takes their bills; set ROUTER_DATA_DIR to keep the outbox on disk",
            self._entries.count,
            self._entries.held_bytes,
            self._max_memory_bytes,
        )

    async def keep(
        self,
        commits: Sequence[pc.CommitRequest],
        estimate_nanos: int = 0,
        replaces: str | None = None,
    ) -> None:
        """Records the commits durably (fsync) before the answer they bill is sent. Raises
        ``JournalError`` when they are not known durable (they may still be billed: an
        entry written to the journal is, whatever becomes of this call; one whose line could
        not be written, a full disk, is held in memory for the replay, ``written`` all the
        same: billed if the router lives, said and counted as dropped if it stops first).
        ``estimate_nanos``:
        the bill's estimated cost, journalled with the time it counts in, and counted against
        its tenant's budgets (``estimate_kept``) as soon as the line is in the file, before its
        fsync and whether or not this call is still awaited: a router stopped once the line
        is written (a forced shutdown cancelling the keep, a SIGKILL during a slow fsync or
        while a slow caller reads the answer) has counted the estimate that the replay at its
        next start corrects by the bill (``estimate_billed``). Logged if an outbox in memory
        loses it at shutdown.
        ``replaces``: the call's open call, which this entry takes the place of in one line
        (the caller then ``release``s it). An entry kept again (a call's bill without its
        answer in the place of the answer's) keeps the time of its first keep, and counts the
        difference of its estimates: the count and the correction land in the same day and
        month, however late the later keep is."""
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)  # the current request's span
        entry_id = replaces if replaces is not None else secrets.token_hex(8)
        counted = self._counts.kept(entry_id, estimate_nanos)
        tenant = commits[-1].tenant if commits else ""
        written = partial(self._counts.written, entry_id, tenant, counted)
        self._prefix_down = True  # it did not take this bill (why it is kept)
        await self._entries.add(entry_id, tuple(commits), carrier, counted, written)
        self._say_if_full()

    async def close(self) -> None:
        """The last flush, at shutdown (the calls that billed are over). A journal keeps what
        prefix-cache did not take; an outbox in memory, and the bills a journal could not write
        (held in memory), lose it with the process, so each bill still held is logged at ERROR
        with its key, tenant and estimated cost, and counted (``dropped``): never silent."""
        try:
            await self.flush()
        finally:
            entries = self._entries
            held = entries if isinstance(entries, MemoryEntries) else entries.held
            why = "no ROUTER_DATA_DIR" if held is entries else "its journal unwritable"
            for commits, nanos in held.held():
                final = commits[-1]
                log.error(
                    "billing outbox: the router stops with prefix-cache unreachable and %s: "
                    "the bill of %s (tenant %s, model %s, %d output tokens, estimated "
                    "cost_nanos=%d) is lost",
                    why,
                    final.request_id,
                    final.tenant,
                    final.model,
                    final.output_tokens,
                    nanos,
                )
            if held.count and self._dropped is not None:
                self._dropped(held.count)  # never billed

    async def flush(self) -> int:
        """Sends what is pending, in order, until prefix-cache is unreachable; an entry it
        refuses otherwise stays for the next round and the next entries are sent (one entry
        must not hold all billing back). Returns how many entries were billed (not those
        prefix-cache refused for good: ``dropped``)."""
        settled = 0
        open_calls = 0  # of those, open calls billed at their estimate
        dropped = 0  # entries refused for good: done, never billed
        # each "done" written, with its entry's keep time (``_undone``'s, if it fails)
        done_lines: list[tuple[str, int | None, asyncio.Future[None]]] = []
        async with self._lock:
            if isinstance(self._entries, DiskEntries):
                await self._entries.retry_held()  # held bills into the journal, if it is back
            ids = await self._entries.ids()
            known = set(ids)  # the others' "done" ran (not its write)
            self._undone = {i: at for i, at in self._undone.items() if i in known}
            self._replayer.forget_all_but(ids)
            for entry_id in ids:
                if entry_id in self._live:
                    continue  # a model call of this process, still running
                if entry_id in self._undone:  # settled: its "done" again, not its commits
                    kept_ms = self._undone.pop(entry_id)
                    done_lines.append((entry_id, kept_ms, self._entries.done(entry_id)))
                    continue
                try:
                    (commits, carrier, started_ms, counted), open_call = await self._entries.read(
                        entry_id
                    )
                except KeyError:
                    continue  # an open call settled since the ids were read
                except UnreadableEntry as exc:
                    log.error("billing outbox: %s; dropped", exc)
                    (commits, carrier, started_ms, counted), open_call = UNREADABLE
                estimate = counted.estimate_nanos if counted is not None else None
                outcome, reply = await self._replayer.replay(entry_id, commits, carrier, estimate)
                if outcome is Sent.UNREACHABLE:
                    self._prefix_down = True
                    break
                self._prefix_down = False  # it answered
                if outcome is Sent.KEPT:
                    continue
                if outcome is Sent.DROPPED:
                    dropped += 1
                else:
                    settled += 1
                    open_calls += open_call
                    final = commits[-1] if commits else None
                    self._counts.replayed(entry_id, final, reply, open_call, started_ms, counted)
                kept_ms = self._kept_since(entry_id)
                self._counts.done(entry_id)
                done_lines.append((entry_id, kept_ms, self._entries.done(entry_id)))
            await asyncio.gather(*(line for *_, line in done_lines), return_exceptions=True)
            for entry_id, kept_ms, line in done_lines:
                self._done_failed(entry_id, kept_ms, line)
        if open_calls:
            log.warning(
                "billing outbox: billed %d open calls at prefix-cache's estimate (model calls "
                "left without their FINAL: by a killed router, or a bill that failed)",
                open_calls,
            )
            if self._open_calls_settled is not None:
                self._open_calls_settled(open_calls)
        if dropped and self._dropped is not None:
            self._dropped(dropped)
        if settled:
            log.info("billing outbox: billed %d answers, %d pending", settled, self.pending)
            self._say_if_full()
        return settled

    def _kept_since(self, entry_id: str) -> int | None:
        """When the entry was first kept (an earlier process's: this process's start)."""
        kept_ms = self._counts.kept_at_ms(entry_id)
        if kept_ms is None and self._counts.inherited(entry_id):
            return self._started_ms
        return kept_ms

    def _done_failed(
        self, entry_id: str, kept_ms: int | None, written: asyncio.Future[None]
    ) -> None:
        """A settled entry's "done", once it ran: one that failed is remembered, not replayed."""
        if not written.cancelled() and (exc := written.exception()) is not None:
            log.warning("billing outbox: journal write failed: %s", exc)
            self._undone[entry_id] = kept_ms

    async def run(self) -> None:
        """Replays every ``retry_s`` (cancelled at shutdown, after a last ``flush``). A round
        that fails (the journal's disk) is logged and the next one tries again."""
        while True:
            if self.pending:
                try:
                    await self.flush()
                except Exception:
                    log.exception("billing outbox: a replay round failed; retrying")
            await asyncio.sleep(self._retry_s)


def _rewrite_failed(written: asyncio.Future[None]) -> None:
    if not written.cancelled() and (exc := written.exception()) is not None:
        log.debug("billing outbox: rewriting a running model call's line failed: %s", exc)
