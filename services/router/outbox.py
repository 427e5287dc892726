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
is never dropped for a fault that may pass.

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

A replayed FINAL whose reply is ``repeated`` (prefix-cache had recorded that key's FINAL
before) is told to the limiter (``open_call_billed``, ``estimate_billed``) only for an entry
this process kept: it is in the outbox only because no reply to its FINAL reached this process
(the answer's, or the call's bill without its answer, failed after prefix-cache recorded it: a
deadline, a cancel, a connection reset, an internal fault; or a replay of it did: an entry is
done on its first reply), so no one had the first reply, and this one is told. An entry whose
FINAL had its reply is never sent again: an open call is left to a replay only when no bill of
its call was made or kept (``billing.py``), and a settled entry whose "done" did not run is
done again by the next round, not sent. Entries journalled by an earlier process are
``inherited``: whoever had the first reply (that process's answer, whose "done" line a host
crash lost, or its replay) counted it then, so their repeat is not told (and one whose first
reply was lost, by that process or this one, goes uncounted); their estimates were counted by
that process, which a limits store in memory does not remember (``Limiter.reconcile``).

Budgets: a bill kept here (an answer's, or a call's billed without its answer) counts against
its tenant's budgets at the router's estimate (base prices, no cache discount claimed); each
entry keeps that estimate and when it counts (journalled with it: ``Counted``). The outbox
counts it itself (``estimate_kept``: ``Limiter.count_estimate``) as soon as the entry's line
is in the file, before its fsync: an entry in the journal is one whose estimate was counted,
so a replay's correction lands on a count that happened, also after a restart (before, the
count came from the answer's settle once its caller read the end, or from the call's charge
after the fsync: a router stopped in between left a journalled estimate never counted, and
the next start's correction took the month's spend below zero). What remains: a router that
dies after the line is written and before the limits' store has the count (one round trip;
longer while the store is down, as any settle lost in flight). Once its replay is billed the
outbox tells ``estimate_billed`` the difference (prefix-cache's cost minus the estimate) and
that time, so the limiter corrects the budgets of the period the estimate was counted in
(``Limiter.reconcile``), once: on the first reply to the entry's FINAL a process had. An entry
whose call's FINAL is made after all (its keep cancelled after its line went in) takes its
estimate back as it is settled. An entry journalled without them (by an older router)
corrects nothing: its estimate stays counted, as before. The router's cost counters, which
counted the estimate too, are told the same correction (``cost_corrected``: a counter of its
own, by sign, a counter never decreasing), and an open call's whole bill (counted by none), so
that they sum to what was billed.

Each entry's replay joins the trace of the request it bills, recorded once for an outage of
prefix-cache however long (``outbox_replay``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from opentelemetry import trace

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import Clock, MonotonicClock, SystemClock, Throttles, suppressed
from services.router.dependencies import PrefixPort
from services.router.outbox_entries import UNREADABLE, DiskEntries, MemoryEntries
from services.router.outbox_journal import Counted, Journal, UnreadableEntry
from services.router.outbox_replay import (
    KEPT_LOG_EVERY_MS,
    PROPAGATOR,
    BilledLayer,
    PrefixServing,
    Replayer,
    Sent,
)

log = logging.getLogger("cachemesh.router.outbox")


@dataclass(frozen=True)
class OpenCallBill:
    """An open call a replay billed first (a killed router's model call; not a replay whose
    FINAL prefix-cache had recorded before), for the tenant's limits."""

    tenant: str
    cost_nanos: int  # its FINAL's
    # when the call started (epoch ms): the budget periods it counts in (None: journalled by
    # a router from before it was kept; it counts in those of now)
    started_ms: int | None


class EstimateBilled(Protocol):
    """Told a kept answer's correction once its replay is billed (``Limiter.reconcile``)."""

    def __call__(
        self, tenant: str, correction_nanos: int, counted_ms: int, *, inherited: bool
    ) -> None: ...


# told a replayed bill's cost minus what the router's cost counters counted for it:
# (tenant, nano-dollars, either sign)
CostCorrected = Callable[[str, int], None]
# told a kept bill's estimate as its line is written: (tenant, nano-dollars, when it counts in
# epoch ms); negative, one counted before taken back or replaced (``Limiter.count_estimate``)
EstimateKept = Callable[[str, int, int], None]


@dataclass(frozen=True)
class _Estimate:
    """What this process counted of a kept entry's estimate."""

    tenant: str
    counted: Counted


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
        self._cost_corrected = cost_corrected
        self._max_memory_bytes = max_memory_bytes
        self._said_full = False
        self._retry_s = retry_s
        self._lock = asyncio.Lock()  # one flush at a time
        self._open_calls_settled = open_calls_settled
        self._dropped = dropped
        self._open_call_billed = open_call_billed
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
        self._estimate_billed = estimate_billed
        self._estimate_kept = estimate_kept
        # the entries this process keeps: when each was first kept (its estimate counts in
        # those periods, however often the entry is kept again), until done or settled
        self._kept_at: dict[str, int] = {}
        # of those, the estimate counted (told ``estimate_kept``) once its line was written
        self._counted: dict[str, _Estimate] = {}
        # the entries journalled by an earlier process (their estimates counted by it)
        self._inherited: set[str] = set()
        # entries this process settled (their FINAL answered: the call's, or a replay's told)
        # whose "done" failed, maybe not run (no thread for its batch): if still pending, a
        # round does them again rather than send them (a repeat would be told as a first
        # reply lost)
        self._undone: set[str] = set()
        # prefix-cache did not take a bill (kept since), and no replay reached it since
        self._prefix_down = False
        self._entries: MemoryEntries | DiskEntries
        if journal is not None:
            self._inherited = set(journal.load())
            loaded = len(self._inherited)
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
        """The entries a replay round sends (not the open calls of model calls running)."""
        return max(self._entries.count - len(self._live), 0)

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
        if self._live.pop(entry_id, None) is not None:
            self._kept_at.pop(entry_id, None)
            kept = self._counted.pop(entry_id, None)
            if kept is not None and self._estimate_kept is not None:
                counted = kept.counted
                self._estimate_kept(kept.tenant, -counted.estimate_nanos, counted.at_ms)
            self._entries.done(entry_id).add_done_callback(partial(self._done_failed, entry_id))

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
        counted = Counted(estimate_nanos, self._kept_at.setdefault(entry_id, self._wall.now_ms()))
        tenant = commits[-1].tenant if commits else ""
        written = partial(self._estimate_written, entry_id, _Estimate(tenant, counted))
        self._prefix_down = True  # it did not take this bill (why it is kept)
        await self._entries.add(entry_id, tuple(commits), carrier, counted, written)
        self._say_if_full()

    def _estimate_written(self, entry_id: str, estimate: _Estimate) -> None:
        """A kept entry's line is in the journal: its estimate counts now, in place of what an
        earlier line of the entry counted."""
        if entry_id not in self._kept_at:
            return  # settled before its line was written (its FINAL made): done after it
        before = self._counted.get(entry_id)
        self._counted[entry_id] = estimate
        change = estimate.counted.estimate_nanos
        if before is not None:
            change -= before.counted.estimate_nanos
        if change and self._estimate_kept is not None:
            self._estimate_kept(estimate.tenant, change, estimate.counted.at_ms)

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
        done_lines: list[tuple[str, asyncio.Future[None]]] = []
        async with self._lock:
            if isinstance(self._entries, DiskEntries):
                await self._entries.retry_held()  # held bills into the journal, if it is back
            ids = await self._entries.ids()
            self._undone.intersection_update(ids)  # the others' "done" ran (not its write)
            self._replayer.forget_all_but(ids)
            for entry_id in ids:
                if entry_id in self._live:
                    continue  # a model call of this process, still running
                if entry_id in self._undone:  # settled: its "done" again, not its commits
                    self._undone.discard(entry_id)
                    done_lines.append((entry_id, self._entries.done(entry_id)))
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
                    # a repeated FINAL was billed before. Of an entry an earlier process
                    # journalled, whoever had the first reply (its answer, or a replay) counted
                    # it then. Of one this process kept, no one did: it is in the outbox only
                    # because no reply to its FINAL reached this process (the answer's, or
                    # this entry's replays': an entry is done on its first reply), so the
                    # first was lost, and this one is told
                    final = commits[-1] if commits else None
                    inherited = entry_id in self._inherited
                    if final is not None and reply is not None:
                        _said_billed(final, reply, estimate)
                    if (
                        final is not None
                        and reply is not None
                        and (not reply.repeated or not inherited)
                    ):
                        self._told(final.tenant, reply, open_call, started_ms, counted, inherited)
                self._inherited.discard(entry_id)
                self._kept_at.pop(entry_id, None)  # its estimate and correction counted
                self._counted.pop(entry_id, None)
                done_lines.append((entry_id, self._entries.done(entry_id)))
            await asyncio.gather(*(line for _, line in done_lines), return_exceptions=True)
            for entry_id, line in done_lines:
                self._done_failed(entry_id, line)
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

    def _told(
        self,
        tenant: str,
        reply: pc.CommitResponse,
        open_call: bool,
        started_ms: int | None,
        counted: Counted | None,
        inherited: bool,
    ) -> None:
        """A replayed bill, the first reply to its FINAL, told to the limits (an open call's
        cost, or a kept bill's correction) and to the cost counters (``cost_corrected``)."""
        cost = reply.cost.cost_nanos
        if open_call:
            if self._open_call_billed is not None:
                self._open_call_billed(OpenCallBill(tenant, cost, started_ms))
            if self._cost_corrected is not None:
                self._cost_corrected(tenant, cost)
        elif counted is not None:
            correction = cost - counted.estimate_nanos
            if self._estimate_billed is not None:
                self._estimate_billed(tenant, correction, counted.at_ms, inherited=inherited)
            if self._cost_corrected is not None:
                self._cost_corrected(tenant, correction)

    def _done_failed(self, entry_id: str, written: asyncio.Future[None]) -> None:
        """A settled entry's "done", once it ran: one that failed is remembered, not replayed."""
        if not written.cancelled() and (exc := written.exception()) is not None:
            log.warning("billing outbox: journal write failed: %s", exc)
            self._undone.add(entry_id)

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


def _said_billed(
    final: pc.CommitRequest, reply: pc.CommitResponse, estimate_nanos: int | None
) -> None:
    """One INFO line per replayed bill: the estimate its request's trace and access line
    carry, and what it was billed (an operator reconciles the two by the request's key)."""
    if final.phase != pc.COMMIT_PHASE_FINAL:
        return
    estimated = "none kept" if estimate_nanos is None else str(estimate_nanos)
    log.info(
        "billing outbox: replayed the bill of %s (tenant %s, model %s): estimated "
        "cost_nanos=%s, billed cost_nanos=%d%s",
        final.request_id,
        final.tenant,
        final.model,
        estimated,
        reply.cost.cost_nanos,
        " (billed before: a repeated FINAL)" if reply.repeated else "",
    )


def _rewrite_failed(written: asyncio.Future[None]) -> None:
    if not written.cancelled() and (exc := written.exception()) is not None:
        log.debug("billing outbox: rewriting a running model call's line failed: %s", exc)
