"""What the billing outbox (``outbox.py``) tells of the bills it keeps and replays: each kept
bill's estimate, counted against its tenant's budgets as its line is written, and taken back if
its call's FINAL is made after all; and each replayed bill's first reply, told to the limits (a
kept bill's correction, an open call's cost) and to the router's cost counters (``BillCounts``).

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

Budgets: a bill kept in the outbox (an answer's, or a call's billed without its answer) counts
against its tenant's budgets at the router's estimate (base prices, no cache discount claimed);
each entry keeps that estimate and when it counts (journalled with it: ``Counted``). The outbox
counts it itself (``estimate_kept``: ``Limiter.count_estimate``) as soon as the entry's line is
in the file, before its fsync: an entry in the journal is one whose estimate was counted, so a
replay's correction lands on a count that happened, also after a restart (before, the count
came from the answer's settle once its caller read the end, or from the call's charge after the
fsync: a router stopped in between left a journalled estimate never counted, and the next
start's correction took the month's spend below zero). What remains: a router that dies after
the line is written and before the limits' store has the count (one round trip; longer while
the store is down, as any settle lost in flight). Once its replay is billed the outbox tells
``estimate_billed`` the difference (prefix-cache's cost minus the estimate) and that time, so
the limiter corrects the budgets of the period the estimate was counted in
(``Limiter.reconcile``), once: on the first reply to the entry's FINAL a process had. An entry
whose call's FINAL is made after all (its keep cancelled after its line went in) takes its
estimate back as it is settled. An entry journalled without them (by an older router) corrects
nothing: its estimate stays counted, as before. The router's cost counters, which counted the
estimate too, are told the same correction (``cost_corrected``: a counter of its own, by sign,
a counter never decreasing), and an open call's whole bill (counted by none), so that they sum
to what was billed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import Clock
from services.router.outbox_journal import Counted

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


class BillCounts:
    """The outbox's entries as the budgets and the cost counters know them (by entry id): when
    each this process keeps was first kept, the estimate counted once its line was written, and
    which were journalled by an earlier process. Each callback is told as ``BillingOutbox``
    says (None: not told)."""

    def __init__(
        self,
        wall: Clock,
        inherited: Iterable[str] = (),
        *,
        estimate_kept: EstimateKept | None = None,
        estimate_billed: EstimateBilled | None = None,
        open_call_billed: Callable[[OpenCallBill], None] | None = None,
        cost_corrected: CostCorrected | None = None,
    ) -> None:
        self._wall = wall
        self._estimate_kept = estimate_kept
        self._estimate_billed = estimate_billed
        self._open_call_billed = open_call_billed
        self._cost_corrected = cost_corrected
        # the entries this process keeps: when each was first kept (its estimate counts in
        # those periods, however often the entry is kept again), until done or settled
        self._kept_at: dict[str, int] = {}
        # of those, the estimate counted (told ``estimate_kept``) once its line was written
        self._counted: dict[str, _Estimate] = {}
        # the entries journalled by an earlier process (their estimates counted by it)
        self._inherited = set(inherited)

    def kept(self, entry_id: str, estimate_nanos: int) -> Counted:
        """A bill kept (again) as ``entry_id``: its estimate, counting in the periods of the
        entry's first keep (now, for a new one)."""
        return Counted(estimate_nanos, self._kept_at.setdefault(entry_id, self._wall.now_ms()))

    def oldest_kept_ms(self) -> int | None:
        """When the oldest entry this process kept and still holds was first kept (wall ms;
        the first of ``_kept_at``, which keeps the order of first keeps), None for none."""
        return next(iter(self._kept_at.values()), None)

    def kept_at_ms(self, entry_id: str) -> int | None:
        """When this process first kept the entry (wall ms), None if it did not."""
        return self._kept_at.get(entry_id)

    def inherited(self, entry_id: str) -> bool:
        """An earlier process journalled the entry, not done yet."""
        return entry_id in self._inherited

    @property
    def inherited_pending(self) -> bool:
        """Entries journalled by an earlier process are not all done yet."""
        return bool(self._inherited)

    def written(self, entry_id: str, tenant: str, counted: Counted) -> None:
        """A kept entry's line is in the journal: its estimate counts now, in place of what an
        earlier line of the entry counted."""
        if entry_id not in self._kept_at:
            return  # settled before its line was written (its FINAL made): done after it
        before = self._counted.get(entry_id)
        self._counted[entry_id] = _Estimate(tenant, counted)
        change = counted.estimate_nanos
        if before is not None:
            change -= before.counted.estimate_nanos
        if change and self._estimate_kept is not None:
            self._estimate_kept(tenant, change, counted.at_ms)

    def settled(self, entry_id: str) -> None:
        """An open call's FINAL was made: a bill kept in its place whose line was written all
        the same has its estimate, counted then, taken back (the FINAL's bill counts instead)."""
        self._kept_at.pop(entry_id, None)
        kept = self._counted.pop(entry_id, None)
        if kept is not None and self._estimate_kept is not None:
            counted = kept.counted
            self._estimate_kept(kept.tenant, -counted.estimate_nanos, counted.at_ms)

    def replayed(
        self,
        entry_id: str,
        final: pc.CommitRequest | None,
        reply: pc.CommitResponse | None,
        open_call: bool,
        started_ms: int | None,
        counted: Counted | None,
    ) -> None:
        """A replay billed the entry (its last commit ``final``, and prefix-cache's reply to
        it): said in one line, and told as the first reply to its FINAL (a repeated one, billed
        before, is not told of an inherited entry: whoever had its first reply counted it)."""
        if final is None or reply is None:
            return
        _said_billed(final, reply, None if counted is None else counted.estimate_nanos)
        # a repeated FINAL was billed before. Of an entry an earlier process journalled,
        # whoever had the first reply (its answer, or a replay) counted it then. Of one this
        # process kept, no one did: it is in the outbox only because no reply to its FINAL
        # reached this process (the answer's, or this entry's replays': an entry is done on
        # its first reply), so the first was lost, and this one is told
        inherited = entry_id in self._inherited
        if not reply.repeated or not inherited:
            self._told(final.tenant, reply, open_call, started_ms, counted, inherited)

    def done(self, entry_id: str) -> None:
        """The entry is done (billed, or dropped for good): its estimate and correction were
        counted."""
        self._inherited.discard(entry_id)
        self._kept_at.pop(entry_id, None)
        self._counted.pop(entry_id, None)

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
