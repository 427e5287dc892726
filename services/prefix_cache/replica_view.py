"""prefix-cache's approximate view of each model replica's KV cache (L3).

The replicas hold the truth; this view mirrors it from what prefix-cache sees: a WARM commit
names the replica that prefilled the prompt, so its blocks are inserted there (routing
decisions), and the replica's own report of the tokens it reused (``kv_cached_tokens``) is
compared with the prediction (replica reports): the difference is counted as the view's error
(after the prefill the replica holds every block of the prompt again, so the view inserts
them all either way). The hashes and the LRU policy
are the engine's own (``services.common.kv_blocks``), with the same capacity in blocks, so
when every request goes through one prefix-cache the view is exact.

A self-hosted engine behind a provider adapter (llama-server, vLLM) tells its reuse only at
the end: its WARM leaves a note (the touch of each block predicted), and the FINAL's report
is scored then; an engine that tells it at its first token (the simulator) is scored at the
WARM. Either report below the prediction corrects the view: the engine had lost the first
block it did not reuse (a restart, or eviction by traffic the view did not see), and an LRU
engine lost every block touched no later than that one with it, so the view evicts those (the
prompt's own blocks, touched again by its prefill, stay). A report of 0 against a prediction
thus clears what the view held for that replica up to that prefix's last touch. A call
handed over as stalled where the view predicted it warm (``stalled``: it has no commit, so no
report) is weaker evidence (a healthy but slow or shared engine stalls too): the view loses
that prompt's own blocks there, no other's, and of those only the ones a lost prefix must
have taken for the call to stall (``_first_lost_at_stall``: a shared system prompt shorter
than that stays, as the tenant's other conversations still use it there); so a restarted
engine costs one stall for each conversation predicted warm there (not one for each shared
prefix: before, one stall on a healthy slow replica evicted a 1,024-token system prompt ten
conversations shared, and the other nine went from 1,408 predicted tokens to 0) until its
reports correct the rest, or until a WARM names the engine's new run (``engine``: its run,
``GenerateStart.engine_instance``, changed: a restart), which drops the replica's whole view
as an idle view is dropped (``_drop``; notes of the old view are not applied to the new).
Only a block the view held when the request arrived (``mark`` at its Plan) is evidence: one it
learned since (a concurrent request of the same prefix, recorded first) the engine may not have
held yet when it prefilled this one (vLLM batches them; two WARMs may arrive in either order).

The engine counts its reuse in its own tokens (``EngineReuse``, with its count of the whole
prompt), the view in prefix-cache's (cl100k), and the two differ (a large-vocabulary engine
counts German text ~0.8 of cl100k). So a report is compared in the view's tokens: a reuse of
every block the engine could reuse of its prompt is a full reuse; any other is scaled by the
two counts of the prompt, and is known only within their difference plus a block (a text's
tokens are not spread evenly, and the engine's blocks fall elsewhere), so only the blocks
from there on are taken as lost. With one count (the same tokenizer) the comparison is exact.

The view lives in this process: with several prefix-cache replicas each keeps its own
(approximate, by design); the shared state in Redis is the provider prompt cache.

A replica's view (up to the capacity in blocks: ~12 MB at the default 65,536) is dropped once
no Plan has named the replica and no WARM has recorded on it for ``idle_ms``
(``PREFIX_CACHE_REPLICA_IDLE_S``): a replica taken out of the routers' ``MODEL_REPLICAS`` (a
move, a scale-down, a pod with a new address) is never named again, and its view was kept for
the life of the process (six rollouts of two replicas: 12 views, 145 MB, for 2 live ones).
A view made again for a replica named after its drop is a new epoch: its touches count on
from above every dropped view's (``KvBlockCache.first_touch``), so a Plan's ``mark`` of the
dropped view is below all of them (no block of the new view is evidence for that request), and
a note taken on the dropped view is scored at its FINAL but never applied to the new one.
Before, a late FINAL's stamps from the dropped view evicted the new view's blocks (a report of
0 against a prediction of 64 tokens wiped 20 blocks the replica held, and the next turns were
billed their reused prefix at the input price).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.clock import Clock
from services.common.holdings import TenantOrder
from services.common.kv_blocks import BLOCK_SIZE, KvBlockCache, block_hashes, reusable_blocks

# The most predicted blocks the notes awaiting a FINAL hold in all (8 bytes each: 8 MB); past
# it the tenant holding the most loses its oldest note (``TenantOrder``: one tenant's flood
# drops its own notes, not another's), and those FINALs are not scored.
AWAITED_BLOCKS = 1 << 20
# a replica's engine runs kept (``ReplicaViews.engine``): a WARM of one of these before the
# current is a late one of a restarted engine, not a restart back to it
_RUNS_KEPT = 4

Awaiting = tuple[str, str]  # (tenant, request id)


@dataclass(frozen=True)
class EngineReuse:
    """An engine's report of its KV reuse for one prompt, in its own tokens."""

    reused_tokens: int  # the prompt's leading tokens it did not prefill
    prompt_tokens: int  # its count of the whole prompt

    def in_view(self, prompt_tokens: int) -> tuple[int, int]:
        """The reuse in the view's tokens of this prompt (``prompt_tokens`` of them), and how
        many of the view's tokens it may be short by: 0 when both count the prompt alike (one
        tokenizer); else the difference of the two counts plus a block."""
        if self.prompt_tokens == prompt_tokens:
            return self.reused_tokens, 0
        whole = reusable_blocks(prompt_tokens) * BLOCK_SIZE
        if self.reused_tokens >= reusable_blocks(self.prompt_tokens) * BLOCK_SIZE:
            return whole, 0  # every block it could reuse: the whole prompt was held
        scaled = self.reused_tokens * prompt_tokens // max(self.prompt_tokens, 1)
        return min(scaled, whole), abs(self.prompt_tokens - prompt_tokens) + BLOCK_SIZE


@dataclass
class ViewStats:
    reports: int = 0
    predicted_tokens: int = 0
    reported_tokens: int = 0
    abs_error_tokens: int = 0
    corrections: int = 0  # reports below the prediction that evicted blocks
    corrected_blocks: int = 0  # blocks those evicted
    stalls: int = 0  # of the corrections, those for a call stalled where it was predicted warm


@dataclass(frozen=True)
class _Awaited:
    """A WARM whose engine reports its reuse only at the end."""

    replica: str
    predicted_tokens: int
    prompt_tokens: int  # the view's count of the prompt
    stamps: array[int]  # the predicted blocks' last touches before this prefill, head first
    since: int  # the view's last touch when the request arrived: later ones are no evidence
    epoch: int  # the view's ``first_touch``: a note of another view (dropped since) is not applied


class ReplicaViews:
    def __init__(
        self,
        capacity_blocks: int,
        awaited_blocks: int = AWAITED_BLOCKS,
        *,
        clock: Clock | None = None,
        idle_ms: int = 0,
    ) -> None:
        """``clock`` and ``idle_ms`` (> 0): a replica's view is dropped once no Plan named
        it and no WARM recorded on it for ``idle_ms`` (without a clock, never: tools)."""
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        if clock is not None and idle_ms < 1:
            raise ValueError(f"idle_ms must be >= 1, got {idle_ms}")
        self._capacity = capacity_blocks
        self._views: dict[str, KvBlockCache] = {}
        self._clock = clock
        self._idle_ms = idle_ms
        # each view's replica by its last use (a Plan naming it, a WARM on it), oldest first
        self._used: OrderedDict[str, int] = OrderedDict()
        # above every dropped view's touches: where a view made next starts counting (its epoch)
        self._next_epoch = 0
        self._awaited: dict[Awaiting, _Awaited] = {}
        self._awaited_order: TenantOrder[Awaiting] = TenantOrder()
        self._awaited_blocks = 0
        self._awaited_bound = awaited_blocks
        # each replica's engine runs by their WARMs' ``instance`` (``engine``), with the call
        # time of the first WARM of each seen here, the current one last: a run seen before
        # the current one is a restarted engine's (late WARMs of it)
        self._instances: dict[str, list[tuple[str, int]]] = {}
        self.stats = ViewStats()

    def _view(self, replica: str) -> KvBlockCache:
        view = self._views.get(replica)
        if view is None:
            view = self._views[replica] = KvBlockCache(self._capacity, self._next_epoch)
        self._used_now(replica)
        return view

    def _used_now(self, replica: str) -> None:
        """``replica`` was named or served now: its view stays; those idle too long go."""
        if self._clock is None:
            return
        now = self._clock.now_ms()
        self._used[replica] = now
        self._used.move_to_end(replica)
        while self._used:
            oldest, last = next(iter(self._used.items()))
            if last > now - self._idle_ms:
                break
            del self._used[oldest]
            self._drop(oldest)
            self._instances.pop(oldest, None)

    def _drop(self, replica: str) -> int:
        """Forgets the replica's view; the blocks it held."""
        dropped = self._views.pop(replica, None)
        if dropped is None:
            return 0
        # the next view counts on from above it (module doc): a note of this one (``report``)
        # is never applied to the next
        self._next_epoch = max(self._next_epoch, dropped.touches + 1)
        return len(dropped)

    @property
    def replicas(self) -> int:
        """The replicas a view is held of."""
        return len(self._views)

    @staticmethod
    def hashes(tenant: str, model: str, token_ids: Sequence[int]) -> list[bytes]:
        return block_hashes(tenant, model, token_ids)

    def match(self, replica: str, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Tokens the replica is predicted to reuse (full blocks, never the last token)."""
        view = self._views.get(replica)
        if view is None:
            return 0
        self._used_now(replica)  # a Plan names its candidates: the replica is still in use
        return view.cached_tokens(hashes, prompt_tokens)

    def mark(self, replica: str) -> int:
        """Where the replica's view stands now (its last touch): a request's Plan keeps it for
        ``record``'s ``since``."""
        view = self._views.get(replica)
        return 0 if view is None else view.touches

    def record(
        self,
        replica: str,
        hashes: Sequence[bytes],
        prompt_tokens: int,
        reported: EngineReuse | None,
        awaiting: Awaiting | None = None,
        since: int | None = None,
    ) -> int:
        """The replica prefilled this prompt: its blocks are now cached there. A report of the
        tokens it reused is scored against the prediction and, below it, corrects the view as
        ``report`` does; without one, ``awaiting`` (the request's key) keeps a note for
        ``report`` at its FINAL. ``since``: the replica's ``mark`` at the request's Plan
        (None: not known, now). Returns the predicted match."""
        view = self._view(replica)
        predicted = view.cached_tokens(hashes, prompt_tokens)
        arrived = view.touches if since is None else since
        if reported is not None:  # told at the first token: scored and corrected now
            reused, doubt = reported.in_view(prompt_tokens)
            self._score(predicted, reused)
            lost = _first_lost(reused, doubt, predicted)
            stamp = None if lost is None else view.touched(hashes[: lost + 1])[lost]
            view.insert(hashes)
            if stamp is not None and stamp <= arrived:
                self._correct(view, stamp)
            return predicted
        if awaiting is not None and awaiting not in self._awaited:
            stamps = array("q", view.touched(hashes[: reusable_blocks(prompt_tokens)]))
            note = _Awaited(replica, predicted, prompt_tokens, stamps, arrived, view.first_touch)
            self._await(awaiting, note)
        view.insert(hashes)
        return predicted

    def report(self, awaiting: Awaiting, reported: EngineReuse | None) -> None:
        """The FINAL of the WARM noted under ``awaiting``, with the tokens its engine reused
        (None: no report, the note is dropped). Scored; below the prediction, the view loses
        the first block the engine did not reuse and every block touched no later."""
        note = self._awaited.pop(awaiting, None)
        if note is None:  # not noted here (another process, or dropped), or reported already
            return
        self._awaited_order.remove(awaiting[0], awaiting)
        self._awaited_blocks -= max(len(note.stamps), 1)
        if reported is None:
            return
        reused, doubt = reported.in_view(note.prompt_tokens)
        self._score(note.predicted_tokens, reused)
        lost = _first_lost(reused, doubt, note.predicted_tokens)
        view = self._views.get(note.replica)
        if view is None or view.first_touch != note.epoch:  # its view was dropped since
            return
        if lost is not None and note.stamps[lost] <= note.since:
            self._correct(view, note.stamps[lost])

    def engine(self, replica: str, instance: str, called_at_ms: int) -> bool | None:
        """A WARM's engine run on ``replica`` (``GenerateStart.engine_instance``; empty: not
        known, nothing changes), of a call made at ``called_at_ms`` (the router's time of it:
        its Plan's, or the WARM's arrival here). A run not seen there before, after another:
        the engine restarted, its KV cache gone, so the replica's view is forgotten (every
        tenant's blocks), counted as a correction with the blocks it held; the notes awaiting
        FINALs are kept (a FINAL is still scored) but no note of the forgotten view is
        applied to the new one (``_drop``: a new view's epoch).
        True: the WARM's engine is the current one (the view was wiped if it is new); False:
        a late WARM, whose prefill no engine holds now: a run seen before the current one, or
        a run not seen here whose call was made before the current run was first seen here
        (it cannot be a newer one: a WARM sent again late, from an engine since restarted,
        which this process may never have seen: restarted itself, another prefix-cache
        process, a run fallen off the kept ``_RUNS_KEPT``); None: not known.
        A late WARM records nothing and wipes nothing: before, a late WARM of the previous
        run reaching a prefix-cache that knew only the live one made the old run current,
        wiped the live run's view, and every later WARM of the live run was taken as late
        (recorded nothing) until the engine restarted again. With no run seen yet there is
        nothing to judge a WARM late against: its run is the first (a dead one is forgotten
        by the live run's first WARM, called after it)."""
        if not instance:
            return None
        runs = self._instances.setdefault(replica, [])
        if runs and runs[-1][0] == instance:
            return True
        if any(run == instance for run, _ in runs):
            return False
        if runs and called_at_ms < runs[-1][1]:
            return False
        runs.append((instance, called_at_ms))
        del runs[:-_RUNS_KEPT]
        if len(runs) > 1:  # the first run seen says nothing of the view learned so far
            blocks = self._drop(replica)
            self.stats.corrections += 1
            self.stats.corrected_blocks += blocks
        return True

    def stalled(self, replica: str, hashes: Sequence[bytes], prompt_tokens: int, since: int) -> int:
        """A call of this prompt to ``replica``, predicted warm there, stalled before its first
        report and was handed over: the replica may have lost this prompt's prefix (a restarted
        engine, traffic the view did not see), or merely been slow or busy (a stall shows no
        more), so the view loses this prompt's own blocks there, from the first one a lost
        prefix must have taken (``_first_lost_at_stall``) on, not (as a report's ``_correct``)
        every block touched no later: those may be other conversations', other tenants', that a
        healthy engine still holds (and so may a prefix shared with them below that block).
        This conversation goes to the replica that took it over anyway (its prefix is warm
        there now). Only when the prompt's first block was held at the request's Plan
        (``since``: the replica's ``mark`` then; one learned later, from a concurrent request
        of the prefix, the engine prefilled again). Such a call has no WARM
        or FINAL of its own, so no report of the engine would ever correct the view. Returns
        the blocks evicted."""
        view = self._views.get(replica)
        reusable = reusable_blocks(prompt_tokens)
        if view is None or reusable < 1:
            return 0
        stamps = view.touched(hashes[:reusable])
        if not stamps or stamps[0] > since:
            return 0
        evicted = view.evict(hashes[_first_lost_at_stall(len(stamps), prompt_tokens) :])
        self.stats.stalls += 1
        self.stats.corrections += 1
        self.stats.corrected_blocks += evicted
        return evicted

    def _correct(self, view: KvBlockCache, stamp: int) -> None:
        self.stats.corrections += 1
        self.stats.corrected_blocks += view.evict_touched_by(stamp)

    def _score(self, predicted: int, reported: int) -> None:
        self.stats.reports += 1
        self.stats.predicted_tokens += predicted
        self.stats.reported_tokens += reported
        self.stats.abs_error_tokens += abs(predicted - reported)

    def _await(self, key: Awaiting, note: _Awaited) -> None:
        weight = max(len(note.stamps), 1)
        self._awaited[key] = note
        self._awaited_order.put(key[0], key, weight)
        self._awaited_blocks += weight
        while len(self._awaited) > 1 and self._awaited_blocks > self._awaited_bound:
            tenant, out = self._awaited_order.next_out()
            self._awaited_order.remove(tenant, out)
            self._awaited_blocks -= max(len(self._awaited.pop(out).stamps), 1)


def _first_lost_at_stall(held_blocks: int, prompt_tokens: int) -> int:
    """The first block of a prompt the engine surely lost, if a lost prefix is what stalled a
    call predicted to reuse its ``held_blocks`` leading blocks: a stall bound of STALL_FACTOR
    (2) times the warm prefill (P - m tokens, m predicted) is overrun by a prefill of P - h
    (h held) only if h < 2m - P (the router's floor and queue terms lower that bound further:
    not known here), so the blocks from there on are lost, those below it may be held (a
    system prompt the tenant's other conversations share, touched by them)."""
    held_bound = 2 * held_blocks * BLOCK_SIZE - prompt_tokens
    return max(held_bound, 0) // BLOCK_SIZE


def _first_lost(reused: int, doubt: int, predicted: int) -> int | None:
    """The first predicted block the engine surely did not hold, having reused ``reused`` of
    the view's tokens, maybe ``doubt`` more (``EngineReuse.in_view``); None if none."""
    lost = (reused + doubt) // BLOCK_SIZE
    return lost if lost < predicted // BLOCK_SIZE else None
