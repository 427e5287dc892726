"""What the router knows about each model replica's queue and speed, from the replicas' own
reports.

For every request it sends, the router records the prefill it expects the replica to do (the
prompt minus the predicted warm prefix) until the replica's first report (``GenerateStart``,
which comes when its prefill is done). From those reports it measures each replica's prefill
rate: a replica serves its prefills one at a time (continuous-batching engines schedule prefill
one after another; the model replica's queue is tenant-fair, ``services/model/fair_queue.py``,
so first reports need not come in the order the calls were sent: a light tenant's prompt
overtakes a flood's), so a request's prefill began when it was sent or when the previous first
report came, whichever is later, whatever the order, and its measured duration covers
``prompt_tokens - kv_cached_tokens`` (the replica's own count). The rate is a ratio of
exponentially weighted sums (tokens over seconds), so a slow or fast spell moves it within a
few requests; until a replica has reported, the model table's rate (or a configured prior)
stands in.

The prefill queued ahead of a new request is the predicted prefill of the requests still
waiting for their first report (a call waiting in the replica's fair queue, or at its
``MODEL_MAX_CONCURRENT_CALLS`` gate, has sent none: it counts) that the replica's fair queue
serves before it (``_overtaken``), less what the one in progress has already done (the oldest
taken as that one). Those are the one in progress, the request's own tenant's (first come
first served within a tenant) and, of each other tenant's, as many as deficit round robin lets
through before the request's turn: the rounds its tenant needs for its own backlog and its
prompt (``QUANTUM`` tokens of credit a round, ``services/common/fair_share.py``) give each other
tenant as much credit (one round less for a tenant that entered the round after it), each of
its calls costing its uncached prompt tokens where the engine batches (the simulator's queue)
or its prompt tokens where it serves a few at a time (the provider adapter's gate). So a light
tenant's request waits behind the call in progress and about one quantum of each other
tenant's backlog, not all of it; one tenant's requests wait behind all of their own, as every
request did before the prediction was per tenant (a replay of one tenant, as ``make
bench-prefix``'s, is predicted the same to the bit). It assumes what a fresh queue does: the
deficits tenants carry over from earlier turns are not known here (taken as none), nor which
call the engine really took (the oldest is taken as in progress). Their prompts'
blocks count as held by the replica for the next request (it runs after them, so it finds them
there), which prefix-cache's view only learns at their WARM commit. A request whose caller
left before its first report stays in that queue until its predicted end where its engine
prefills it all the same (``abandoned``: llama-server runs a batch to its end), ahead of every
tenant's request (the engine has it: no turn left to wait for), its prompt no
longer counted as warm (one left while it waited at the replica's gate never reached the
engine: counted all the same until its predicted end, an over-estimate the router cannot tell).

That order holds only where the replica serves its waiting calls' turns by tenant: the
simulator's prefill queue, or a provider replica's ``MODEL_MAX_CONCURRENT_CALLS`` gate (by
default a self-hosted row's ``replica_slots``; a gate wider than the engine's own concurrency
leaves the excess to the engine's order). Without a gate (a hosted provider, a batching engine,
vLLM or SGLang, with the setting unset) the engine serves them first come first served: a
light tenant's call waits behind every call sent before it, whoever's, so there every one
counts (as for one tenant). Which it is, the replica says in each first report
(``GenerateStart.tenant_fair_queue``, ``queue_reported``); until it has (or a replica too old
to say), its model row decides (``sent``'s ``fair_queue``: the dispatcher's guess, true for a
simulated row or one with ``replica_slots``).

That is a batching engine's queue (vLLM, SGLang, the simulator: a request's prefill runs
beside the others' decodes). An engine that serves ``slots`` requests at a time (the model
row's ``replica_slots``: llama-server's ``--parallel``) starts a request only when one of its
slots is free, so there a call decoding its answer occupies a slot until its end: each
request ahead takes the first slot to free up (its prefill after the prefill ahead), and
keeps it for its predicted decode. A decode's length is measured there too (weighted sums of
whole answers' tokens and seconds from the first report to the end); a call decoding past
the typical answer counts as running as long again as it has run, up to its ``max_tokens``
at the measured pace; with no answer measured yet, as long again as it has run.

One event loop owns it: no lock. Times come from the caller's clock (seconds).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.fair_share import MIN_COST, QUANTUM
from services.common.kv_blocks import BLOCK_SIZE, reusable_blocks

# a report of fewer prefilled tokens than this is mostly fixed overhead: no rate sample
MIN_SAMPLE_TOKENS = 256
RATE_WEIGHT = 0.2  # the newest sample's weight in the rate's weighted sums
# a request still waiting for its first report this long after its prefill began (its
# predicted prefill times STALL_FACTOR, plus STALL_FLOOR_S) is stalled: see ``queued_s``
STALL_FACTOR = 2.0
STALL_FLOOR_S = 1.0


def check_kv_capacity(kv_capacity_tokens: int | None) -> None:
    """Refuses a replica KV capacity below one ``BLOCK_SIZE`` block (None: no eviction model):
    a cache that small holds no block, so no prefix can be counted as held there."""
    if kv_capacity_tokens is not None and kv_capacity_tokens < BLOCK_SIZE:
        raise ValueError(
            f"kv_capacity_tokens must be at least {BLOCK_SIZE} (one KV block) or None (no "
            f"eviction model), got {kv_capacity_tokens}"
        )


def stalled_after_s(predicted_s: float) -> float:
    """How long after its prefill began a request without a first report is stalled."""
    return STALL_FACTOR * predicted_s + STALL_FLOOR_S


def lost_prefix_explains_stall(
    match_tokens: int, prompt_tokens: int, predicted_s: float, cold_s: float
) -> bool:
    """Whether a stall of a call predicted to reuse ``match_tokens`` of its ``prompt_tokens``
    (its time to first token predicted ``predicted_s``) could come of the replica having lost
    that prefix: only if ``cold_s``, the same prediction (rate, queue ahead) with nothing
    warm, overruns ``stalled_after_s(predicted_s)``, i.e. a cold prefill there would itself
    stall. That needs a predicted share above ``1 - 1 / STALL_FACTOR`` (half): P / r >
    STALL_FACTOR * (P - m) / r + STALL_FLOOR_S needs m > P * (1 - 1 / STALL_FACTOR), whatever
    the rate r, and is checked too (the queue ahead, which a cold cache does not lengthen,
    only raises the bar); but on a fast engine the floor and the queue ahead are more than a
    cold prefill takes (8,000 tokens/s, 3,600 of 4,000 warm: 0.50 s cold against a bound of
    1.10 s). Otherwise the stall says the engine was slow or busy, not that it lost the prefix
    (a Plan predicting 16 of 2,000 tokens warm), and naming it would evict what it holds from
    prefix-cache's view."""
    if not warm_enough_to_stall_cold(match_tokens, prompt_tokens):
        return False
    return cold_s > stalled_after_s(predicted_s)


def warm_enough_to_stall_cold(match_tokens: int, prompt_tokens: int) -> bool:
    """``lost_prefix_explains_stall``'s share test: whether ``match_tokens`` of
    ``prompt_tokens`` predicted warm is above ``1 - 1 / STALL_FACTOR`` of them, without which
    a lost prefix never explains a stall (so its cold prediction need not be made)."""
    return match_tokens > 0 and match_tokens * STALL_FACTOR > prompt_tokens * (STALL_FACTOR - 1)


@dataclass
class _Pending:
    uncached_tokens: int
    written_tokens: int  # the KV blocks its prefill writes, in tokens (``_written``)
    hashes: Sequence[bytes]
    sent_at: float
    max_tokens: int = 0  # its answer's limit (0: not known)
    tenant: str = ""
    cost: int = MIN_COST  # what its turn in the replica's fair queue costs (``_turn_cost``)
    # its caller left before its first report, the engine prefilling it all the same: when
    # that prefill is predicted to end (None: its caller waits)
    abandoned_until: float | None = None


@dataclass
class _Tenant:
    """A tenant's requests waiting for their first report on a replica, whose fair queue
    serves them in turn with the other tenants' (not those whose caller left: ``abandoned``)."""

    calls: OrderedDict[int, _Pending] = field(default_factory=OrderedDict)
    tokens: int = 0  # their predicted prefill
    cost: int = 0  # their turns' cost


@dataclass
class _Decoding:
    """A call decoding its answer on a replica that serves a few requests at a time."""

    started_at: float
    max_tokens: int


@dataclass
class _Replica:
    inflight: int = 0
    pending: OrderedDict[int, _Pending] = field(default_factory=OrderedDict)
    pending_tokens: int = 0  # predicted prefill of the requests waiting for their first report
    pending_blocks: Counter[bytes] = field(default_factory=Counter)
    waiting: dict[str, _Tenant] = field(default_factory=dict)  # the same, by tenant
    last_start_at: float = float("-inf")
    tokens_avg: float = 0.0  # weighted sums of prefilled tokens and their seconds
    seconds_avg: float = 0.0
    samples: int = 0
    sampled_at: float = float("-inf")  # when the rate above was last written (a sample, a stall)
    # with a KV capacity: each block prefilled there that it may still hold, with
    # prefilled_tokens after the last prefill that used it, least recently used first (an LRU
    # of at most a capacity's blocks, whatever the traffic)
    prefilled_tokens: int = 0  # KV blocks written (in tokens: whole blocks), in all
    blocks_at: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    # the replica's signs of life on any call (a first report, a token), counted, and the
    # last one's time: a replica streaming answers is busy, not hung (``progressed``)
    progress: int = 0
    progress_at: float = float("-inf")
    # requests it serves at once (None: it batches: only prefill queues), and, then, the
    # calls decoding there, when a full replica last freed a slot, the weighted sums of whole
    # answers' tokens and decode seconds
    slots: int | None = None
    decoding: dict[int, _Decoding] = field(default_factory=dict)
    slot_freed_at: float = float("-inf")
    decode_tokens_avg: float = 0.0
    decode_seconds_avg: float = 0.0
    decode_samples: int = 0
    abandoned: int = 0  # pending prefills whose caller left ...
    abandoned_next: float = float("inf")  # ... and the soonest of their predicted ends
    # whether it serves its waiting calls' turns by tenant (``fair_queue``): as the replica
    # last reported it (``GenerateStart.tenant_fair_queue``; None: not reported), else as its
    # model row suggests (``sent``'s ``fair_queue``)
    fair_reported: bool | None = None
    fair_expected: bool = False

    @property
    def fair(self) -> bool:
        return self.fair_expected if self.fair_reported is None else self.fair_reported


@dataclass(frozen=True)
class ReplicaRate:
    prefill_tokens_per_s: float
    samples: int  # 0: the prior
    # when the rate was last measured (a first report's sample, a stall's correction; -inf:
    # the prior), on the router's clock
    sampled_at: float = float("-inf")


class ReplicaStates:
    def __init__(self, kv_capacity_tokens: int | None = None) -> None:
        """``kv_capacity_tokens``: each replica's KV cache, for ``surviving_match`` (None: no
        eviction model). At least one ``BLOCK_SIZE`` block, as ``ROUTER_KV_CAPACITY_TOKENS``
        requires: below it the model counted a prompt's blocks as held by a cache too small
        for one (a 15-token cache held a 32-token prefix)."""
        check_kv_capacity(kv_capacity_tokens)
        self._capacity = kv_capacity_tokens
        # the whole blocks it holds, in tokens: the engine caches whole blocks only
        self._capacity_blocks = (kv_capacity_tokens or 0) // BLOCK_SIZE * BLOCK_SIZE
        self._replicas: dict[str, _Replica] = {}
        self._tickets = 0

    def _get(self, replica: str) -> _Replica:
        state = self._replicas.get(replica)
        if state is None:
            state = self._replicas[replica] = _Replica()
        return state

    @property
    def kv_capacity_tokens(self) -> int | None:
        return self._capacity

    # -- the request's life on a replica -----------------------------------------------------

    def sent(
        self,
        replica: str,
        prompt_tokens: int,
        uncached_tokens: int,
        hashes: Sequence[bytes],
        now: float,
        max_tokens: int = 0,
        slots: int | None = None,
        tenant: str = "",
        fair_queue: bool = False,
    ) -> int:
        """The request of ``tenant`` went to ``replica`` expecting ``uncached_tokens`` of
        prefill; returns its ticket for ``started``/``failed``/``ended``. ``slots``: the
        requests the replica's engine serves at once (its model row's ``replica_slots``; None:
        it batches). Requests that name no tenant are all one tenant's (""). ``fair_queue``:
        whether the replica is expected to serve its waiting calls' turns by tenant (its model
        row's guess, until the replica reports it: ``queue_reported``)."""
        state = self._get(replica)
        self._expire(state, now)
        state.slots = slots if slots is None else max(slots, 1)
        state.fair_expected = fair_queue
        self._tickets += 1
        state.inflight += 1
        prompt = max(prompt_tokens, 0)
        uncached = min(max(uncached_tokens, 0), prompt)
        cost = _turn_cost(state, prompt, uncached)
        written = _written(prompt, uncached)
        pending = _Pending(uncached, written, hashes, now, max(max_tokens, 0), tenant, cost)
        state.pending[self._tickets] = pending
        state.pending_tokens += uncached
        state.pending_blocks.update(hashes)
        waiting = state.waiting.get(tenant)
        if waiting is None:
            waiting = state.waiting[tenant] = _Tenant()
        waiting.calls[self._tickets] = pending
        waiting.tokens += uncached
        waiting.cost += cost
        return self._tickets

    def started(
        self,
        replica: str,
        ticket: int,
        prompt_tokens: int,
        kv_cached_tokens: int | None,
        now: float,
    ) -> None:
        """The replica's first report: its prefill is done; it reused ``kv_cached_tokens``
        (None: it cannot tell before the end, as a provider adapter: the reuse predicted when
        the request was sent stands in, or a warm replica would seem to prefill its whole
        prompt in the time it took to prefill the rest, and look that much faster)."""
        state = self._get(replica)
        self._progressed(state, now)
        self._expire(state, now, ticket if ticket in state.pending else None)
        pending = self._forget(state, ticket)
        if pending is None:
            return
        # its prefill began once sent, the one before it done and (slots) a slot free
        began = max(pending.sent_at, state.last_start_at, state.slot_freed_at)
        state.last_start_at = max(state.last_start_at, now)
        if state.slots is not None:
            state.decoding[ticket] = _Decoding(now, pending.max_tokens)
        if kv_cached_tokens is None:
            prefilled = pending.uncached_tokens
        else:
            prefilled = prompt_tokens - kv_cached_tokens
        seconds = now - began
        if self._capacity is not None:
            state.prefilled_tokens += _written(prompt_tokens, prefilled)
            at, blocks = state.prefilled_tokens, state.blocks_at
            for block in pending.hashes:
                blocks[block] = at
                blocks.move_to_end(block)
            while blocks and at - next(iter(blocks.values())) >= self._capacity_blocks:
                blocks.popitem(last=False)  # evicted by now
        if prefilled >= MIN_SAMPLE_TOKENS and seconds > 0:
            if state.samples == 0:
                state.tokens_avg, state.seconds_avg = float(prefilled), seconds
            else:
                state.tokens_avg += RATE_WEIGHT * (prefilled - state.tokens_avg)
                state.seconds_avg += RATE_WEIGHT * (seconds - state.seconds_avg)
            state.samples += 1
            state.sampled_at = now

    def progressed(self, replica: str, now: float) -> None:
        """A sign of life from ``replica`` on one of its calls after its first report (a
        token, the answer's end)."""
        self._progressed(self._get(replica), now)

    @staticmethod
    def _progressed(state: _Replica, now: float) -> None:
        state.progress += 1
        state.progress_at = max(state.progress_at, now)

    def progress(self, replica: str) -> int:
        """How many signs of life (first reports, tokens) ``replica`` has given: a call
        waiting there while it grows waits behind the replica's other calls, it is not
        stalled."""
        state = self._replicas.get(replica)
        return 0 if state is None else state.progress

    def progressed_since(self, replica: str, since: float) -> bool:
        """Whether ``replica`` gave a sign of life (a first report, a token) after ``since``."""
        state = self._replicas.get(replica)
        return state is not None and state.progress_at > since

    def overdue(self, replica: str, tokens_per_s: float, now: float) -> bool:
        """Whether ``replica``'s oldest call still waiting for its first report has taken
        longer than its predicted prefill (at ``tokens_per_s``, from when its prefill began)
        with no sign of life from the replica since then: a call handed over to it would wait
        behind that one, slow the same way (a loaded machine, a prior rate too fast for the
        engines), not hung as one engine is."""
        state = self._replicas.get(replica)
        if state is None or tokens_per_s <= 0:
            return False
        self._expire(state, now)  # a prefill whose caller left, predicted done, is no head
        if not state.pending:
            return False
        head = next(iter(state.pending.values()))
        began = max(head.sent_at, state.last_start_at, state.slot_freed_at)
        if state.progress_at > began:
            return False
        return now - began > head.uncached_tokens / tokens_per_s

    def slots_taken(self, replica: str) -> bool:
        """Whether every slot of a replica that serves a few requests at a time is taken by a
        call decoding its answer there (started, not ended): a call sent there waits for one
        to end, whether or not the router reads those answers meanwhile (a caller reading
        slowly holds its answer's chunks, and the replica's signs of life with them)."""
        state = self._replicas.get(replica)
        return state is not None and state.slots is not None and len(state.decoding) >= state.slots

    def failed(self, replica: str, ticket: int) -> None:
        """The call ended before its first report (the replica failed or the caller left)."""
        state = self._get(replica)
        if self._forget(state, ticket) is not None:
            self.release(replica)

    def queue_reported(self, replica: str, tenant_fair: bool) -> None:
        """The replica said whether it serves its waiting calls' turns by tenant
        (``GenerateStart.tenant_fair_queue``: a fair queue in front of its engine) or leaves
        them to its engine, first come first served: that, not its model row's guess, decides
        ``queued_s``'s prediction from now on."""
        self._get(replica).fair_reported = tenant_fair

    def cut_unstarted(self, replica: str, ticket: int) -> None:
        """The call's start came with no first token, only so that the prompt its provider
        reported is billed (its deadline passed before any token:
        ``GenerateStart.cut_before_first_token``): it leaves the queue as a call left before
        its first report does, with no rate sample and no sign of life, and stays in flight
        until ``ended``."""
        state = self._replicas.get(replica)
        if state is not None:
            self._forget(state, ticket)

    def stalled(self, replica: str, ticket: int, now: float) -> None:
        """The call had no first report by ``now`` and is handed over (``dispatch``): its
        prefill, begun at the latest when the one before it was done, takes longer than that,
        so the replica's rate is at most its tokens over that time. A slow engine (a loaded
        machine, a rate measured while it was idle, a row's prior) then gets a longer wait on
        its next call instead of a stall on every call, each counted against it until it is
        ejected. A prompt too short for a rate sample corrects nothing."""
        state = self._replicas.get(replica)
        pending = None if state is None else state.pending.get(ticket)
        if state is None or pending is None:
            return
        seconds = now - max(pending.sent_at, state.last_start_at, state.slot_freed_at)
        tokens = pending.uncached_tokens
        if tokens < MIN_SAMPLE_TOKENS or seconds <= 0:
            return
        if state.samples == 0 or state.seconds_avg <= 0:
            state.tokens_avg, state.seconds_avg, state.samples = float(tokens), seconds, 1
            state.sampled_at = now
        elif state.tokens_avg / state.seconds_avg > tokens / seconds:
            state.seconds_avg = state.tokens_avg * seconds / tokens
            state.sampled_at = now

    def abandoned(self, replica: str, ticket: int, tokens_per_s: float, now: float) -> None:
        """The caller left before the call's first report, but the engine prefills its prompt
        all the same (llama-server runs a batch to its end): released, its prefill kept in
        the replica's queue until its predicted end (``tokens_per_s``: the replica's rate).
        Its prompt does not count as warm there: the engine may not keep what it dropped."""
        state = self._replicas.get(replica)
        pending = None if state is None else state.pending.get(ticket)
        if state is None or pending is None:
            return
        if pending.abandoned_until is None:
            self._expire(state, now)
            end_s = self._ahead_s(state, tokens_per_s, now, ticket)
            _unwait(state, ticket, pending)  # the engine has it: no longer a turn to wait for
            hashes, pending.hashes = pending.hashes, ()
            _uncount(state.pending_blocks, hashes)
            pending.abandoned_until = now + end_s
            state.abandoned += 1
            state.abandoned_next = min(state.abandoned_next, pending.abandoned_until)
            self.release(replica)
        self._expire(state, now)

    @staticmethod
    def _expire(state: _Replica, now: float, reported: int | None = None) -> None:
        """Forgets the abandoned prefills predicted to have ended by ``now``, and those ahead
        of ``reported``, a request whose first report came (one at a time, in order): the
        next prefill began when they ended."""
        if state.abandoned == 0 or (reported is None and now < state.abandoned_next):
            return
        state.abandoned_next = float("inf")
        for ticket, pending in list(state.pending.items()):
            if ticket == reported:
                reported = None  # the ones after it stay, the soonest end still counted
                continue
            until = pending.abandoned_until
            if until is None:
                continue
            if until <= now or reported is not None:
                ReplicaStates._forget(state, ticket)
                state.abandoned -= 1
                state.last_start_at = max(state.last_start_at, min(until, now))
            else:
                state.abandoned_next = min(state.abandoned_next, until)

    def ended(self, replica: str, ticket: int, now: float, output_tokens: int | None) -> None:
        """The call's answer ended after its first report (``output_tokens``: whole, of that
        many tokens; None: cut or left, no measure of a decode): released."""
        state = self._replicas.get(replica)
        decoding = None if state is None else state.decoding.pop(ticket, None)
        if state is not None and decoding is not None:
            if state.slots is not None and len(state.decoding) + 1 >= state.slots:
                state.slot_freed_at = max(state.slot_freed_at, now)  # a pending one starts
            seconds = now - decoding.started_at
            if output_tokens is not None and output_tokens > 0 and seconds > 0:
                if state.decode_samples == 0:
                    state.decode_tokens_avg, state.decode_seconds_avg = output_tokens, seconds
                else:
                    state.decode_tokens_avg += RATE_WEIGHT * (
                        output_tokens - state.decode_tokens_avg
                    )
                    state.decode_seconds_avg += RATE_WEIGHT * (seconds - state.decode_seconds_avg)
                state.decode_samples += 1
        self.release(replica)

    def release(self, replica: str) -> None:
        """The call is over (its answer ended); never below zero."""
        state = self._replicas.get(replica)
        if state is not None and state.inflight > 0:
            state.inflight -= 1

    @staticmethod
    def _forget(state: _Replica, ticket: int) -> _Pending | None:
        pending = state.pending.pop(ticket, None)
        if pending is not None:
            _unwait(state, ticket, pending)
            state.pending_tokens -= pending.uncached_tokens
            _uncount(state.pending_blocks, pending.hashes)
        return pending

    # -- what the policies read ---------------------------------------------------------------

    def loads(self) -> dict[str, int]:
        """Requests in flight per replica (SGLang's load)."""
        return {name: s.inflight for name, s in self._replicas.items() if s.inflight}

    def queued_requests(self, replica: str) -> int:
        """Requests sent to ``replica`` still waiting for their first report."""
        state = self._replicas.get(replica)
        return 0 if state is None else len(state.pending)

    def pending_prefill_s(self, replica: str, tokens_per_s: float) -> float:
        """The predicted prefill of the requests sent to ``replica`` still waiting for their
        first report (those whose caller left too: the engine prefills them all the same), at
        ``tokens_per_s``: how long a call decoding there may wait for them between two tokens
        on an engine that runs a prompt's prefill in a batch with the decodes."""
        state = self._replicas.get(replica)
        if state is None or tokens_per_s <= 0:
            return 0.0
        return state.pending_tokens / tokens_per_s

    def rate(self, replica: str, prior_tokens_per_s: float) -> ReplicaRate:
        state = self._replicas.get(replica)
        if state is None or state.samples == 0 or state.seconds_avg <= 0:
            return ReplicaRate(prior_tokens_per_s, 0)
        return ReplicaRate(state.tokens_avg / state.seconds_avg, state.samples, state.sampled_at)

    def queued_s(
        self,
        replica: str,
        tokens_per_s: float,
        now: float,
        *,
        tenant: str = "",
        prompt_tokens: int = 0,
        uncached_tokens: int = 0,
    ) -> float:
        """Seconds of prefill ahead of a request of ``tenant`` sent now (a stalled head counts
        as busy for as long again as it has overrun its predicted prefill); on a replica of a
        few slots, until one is free for it (the calls decoding there and those ahead of it).
        Ahead of it, where the replica serves its calls' turns by tenant (``fair_queue``), as
        its fair queue serves them (``_overtaken``): the one in progress, its tenant's, and the
        other tenants' that their turns let through before its own (``prompt_tokens`` and
        ``uncached_tokens``: its size there, for its turns' cost); elsewhere (its engine's
        own order, first come first served) every call sent before it, whoever's."""
        state = self._replicas.get(replica)
        if state is None:
            return 0.0
        self._expire(state, now)
        if not state.fair:  # its engine's order, first come first served: every call counts
            return self._ahead_s(state, tokens_per_s, now, None)
        cost = _turn_cost(state, max(prompt_tokens, 0), max(uncached_tokens, 0))
        return self._ahead_s(state, tokens_per_s, now, None, (tenant, cost))

    @staticmethod
    def _ahead_s(
        state: _Replica,
        tokens_per_s: float,
        now: float,
        until: int | None,
        turn: tuple[str, int] | None = None,
    ) -> float:
        """Seconds from now until the prefill of the request ``until`` ends (None: until a
        request sent now can begin its own; ``turn``: its tenant and cost, which leave the
        other tenants' requests it overtakes out, else every request sent before counts)."""
        if not state.pending:
            skipped_tokens, skipped = 0, frozenset[int]()
        else:
            head_ticket = next(iter(state.pending))
            skipped_tokens, skipped = (
                (0, frozenset[int]()) if turn is None else _overtaken(state, head_ticket, *turn)
            )
        if state.slots is None:
            if not state.pending:
                return 0.0
            head_ticket, head = next(iter(state.pending.items()))
            head_s = head.uncached_tokens / tokens_per_s
            done_s = max(now - max(head.sent_at, state.last_start_at), 0.0)
            # A head far past its predicted prefill is a stall (a hung replica), not done: it
            # occupies the replica for as long again as it has overrun that, so the longer a
            # replica keeps a request without a first report the less it is chosen.
            queued = max(head_s - done_s, done_s - stalled_after_s(head_s), 0.0)
            if until is None:  # the rest of the queue, without a walk through it
                rest = state.pending_tokens - head.uncached_tokens - skipped_tokens
                return queued + rest / tokens_per_s
            if until != head_ticket:
                for ticket, pending in itertools.islice(state.pending.items(), 1, None):
                    queued += pending.uncached_tokens / tokens_per_s
                    if ticket == until:
                        break
            return queued
        # Each request ahead takes the first slot to free up, prefills after the prefill
        # before it, and holds the slot for its predicted decode (not one whose caller left:
        # the engine drops it after its prefill); a request sent now starts at the next slot
        # free after that, once the prefill ahead is done.
        free = [
            _decode_left_s(state, d.started_at, d.max_tokens, now) for d in state.decoding.values()
        ]
        free += [0.0] * max(state.slots - len(free), 0)
        heapq.heapify(free)
        prefilled = 0.0  # when the prefill queued so far is done, seconds from now
        ahead = (item for item in state.pending.items() if item[0] not in skipped)
        for n, (ticket, pending) in enumerate(ahead):
            own_s = pending.uncached_tokens / tokens_per_s
            slot_s = heapq.heappop(free)
            if n == 0 and slot_s <= 0.0:  # its prefill is under way (or stalled)
                began = max(pending.sent_at, state.last_start_at, state.slot_freed_at)
                done_s = max(now - began, 0.0)
                own_s = max(own_s - done_s, done_s - stalled_after_s(own_s), 0.0)
            prefilled = max(slot_s, prefilled) + own_s
            if ticket == until:
                return prefilled
            decode_s = (
                0.0 if pending.abandoned_until is not None else _decode_s(state, pending.max_tokens)
            )
            heapq.heappush(free, prefilled + decode_s)
        return max(free[0], prefilled)

    def surviving_match(
        self, replica: str, hashes: Sequence[bytes], prompt_tokens: int
    ) -> tuple[int, int | None]:
        """The leading tokens of the prompt the replica will still hold when this request's
        prefill begins, by an LRU model of its cache (``kv_capacity_tokens``: it keeps the
        newest that many tokens' whole blocks): (from prompts queued there, from prompts it
        has prefilled). A prompt's block counts while fewer blocks than the capacity are
        written after it up to then: the queue ahead's, a partial last block of a prompt
        not cached (not written), and the blocks of its own prompt before it (touched after
        it: ``KvBlockCache.insert``'s tail first). Blocks reused after it are not counted (a
        prompt's cached head touched again moves ahead of it in the engine's LRU): the model
        may count a block held that the engine evicted (seldom the reverse: a prompt ending
        on a block's end, that block held, is counted written again); prefix-cache's view
        caps it (``ReplicaChooser._surviving``). The second is
        None while this router's record does not reach back a whole capacity (it has seen
        fewer new tokens prefilled there, queue ahead included, since it started): what was
        prefilled before, as prefix-cache's view names it, may still be held. Without a
        capacity: (``pending_match``, the whole prompt: nothing is known to be evicted)."""
        if self._capacity is None:
            return self.pending_match(replica, hashes, prompt_tokens), prompt_tokens
        capacity = self._capacity_blocks
        state = self._replicas.get(replica)
        if state is None:
            return 0, None
        wanted = hashes[: reusable_blocks(prompt_tokens)]
        queued, after = 0, 0
        for pending in reversed(state.pending.values()):  # newest first
            if after >= capacity:
                break
            queued = max(queued, _common(wanted, pending.hashes))
            after += pending.written_tokens  # one whose caller left is prefilled all the same
        # a block last used at or before this point is evicted by the time the request runs
        evicted_up_to = after + state.prefilled_tokens - capacity
        if evicted_up_to < 0:
            return queued * BLOCK_SIZE, None
        # Block hashes are chained: a block held implies the blocks before it were used
        # with it, at least as recently; so the held prefix ends at the first block gone.
        # A prompt's blocks are touched tail first (``KvBlockCache.insert``): after block j
        # come the j blocks before it, so it is evicted j blocks sooner than its head.
        held = 0
        for block in wanted:
            prefilled_at = state.blocks_at.get(block)
            if prefilled_at is None or prefilled_at - held * BLOCK_SIZE <= evicted_up_to:
                break
            held += 1
        return queued * BLOCK_SIZE, held * BLOCK_SIZE

    def tracked_blocks(self, replica: str) -> int:
        """The KV blocks the eviction model remembers on ``replica`` (at most about a
        capacity's worth, plus the last prompt's)."""
        state = self._replicas.get(replica)
        return len(state.blocks_at) if state is not None else 0

    def pending_match(self, replica: str, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Leading tokens of the prompt that requests queued there will have prefilled."""
        state = self._replicas.get(replica)
        if state is None or not state.pending_blocks:
            return 0
        matched = 0
        for block in hashes[: reusable_blocks(prompt_tokens)]:
            if block not in state.pending_blocks:
                break
            matched += 1
        return matched * BLOCK_SIZE


def _overtaken(state: _Replica, head: int, tenant: str, cost: int) -> tuple[int, frozenset[int]]:
    """The requests waiting on the replica that a request of ``tenant`` costing ``cost``
    would overtake in its fair queue (deficit round robin, ``services/model/fair_queue.py``):
    (their predicted prefill in tokens, their tickets where the replica serves a few at a
    time, else none). The one in progress (``head``, the oldest) and those of ``tenant``
    (first come first served within a tenant) go first; the request's turn comes in the
    round where its tenant's credit (``QUANTUM`` a round, from none) covers their cost and its
    own; each other tenant's requests go first as far as the same rounds' credit covers their
    cost, one round's less for a tenant that entered the round after the request's (its
    oldest request waiting sent later). So a light tenant waits behind about one quantum of
    each other tenant's work, not all of it, and a tenant with a backlog behind an equal share
    of the others'. Deficits left over from earlier turns are not known here (taken as none).
    With one tenant waiting, and for it, none is overtaken."""
    waiting = state.waiting
    own = waiting.get(tenant)
    if not waiting or (own is not None and len(waiting) == 1):
        return 0, frozenset()
    work, place = cost, None  # ``place``: its tenant's oldest request waiting, its turn's order
    if own is not None:
        work += own.cost
        for ticket, pending in own.calls.items():
            if ticket != head:
                place = ticket
                break
            work -= pending.cost  # in progress: no longer a turn to wait for
    rounds = -(-work // QUANTUM)  # the rounds until its tenant's credit covers it
    tokens, tickets = 0, set[int]()
    for name, other in waiting.items():
        if name == tenant:
            continue
        calls = iter(other.calls.items())
        first: tuple[int, _Pending] | None = next(calls)
        left_tokens, left_cost = other.tokens, other.cost
        if first is not None and first[0] == head:  # in progress: no turn to wait for
            left_tokens -= first[1].uncached_tokens
            left_cost -= first[1].cost
            first = next(calls, None)
        if first is None:
            continue
        credit = rounds * QUANTUM
        if place is not None and first[0] > place:
            credit -= QUANTUM  # it entered the round after the request's tenant
        if left_cost <= credit:
            continue  # all of its requests go first
        for ticket, pending in itertools.chain((first,), calls):
            if pending.cost > credit:  # from this one on, after the request
                tokens += left_tokens
                if state.slots is not None:
                    tickets.add(ticket)
                    tickets.update(later for later, _ in calls)
                break
            credit -= pending.cost
            left_tokens -= pending.uncached_tokens
    return tokens, frozenset(tickets)


def _turn_cost(state: _Replica, prompt_tokens: int, uncached_tokens: int) -> int:
    """What a request's turn costs in the replica's fair queue: its uncached prompt tokens
    where the engine batches (the simulator's prefill queue), its prompt tokens where it serves
    a few at a time (the provider adapter's gate of ``MODEL_MAX_CONCURRENT_CALLS``, which
    cannot know the engine's reuse before the call); ``MIN_COST`` at the least."""
    return max(uncached_tokens if state.slots is None else prompt_tokens, MIN_COST)


def _unwait(state: _Replica, ticket: int, pending: _Pending) -> None:
    waiting = state.waiting.get(pending.tenant)
    if waiting is None or waiting.calls.pop(ticket, None) is None:
        return  # its caller left: it left its tenant's turns then (``abandoned``)
    waiting.tokens -= pending.uncached_tokens
    waiting.cost -= pending.cost
    if not waiting.calls:
        del state.waiting[pending.tenant]


def _uncount(blocks: Counter[bytes], hashes: Sequence[bytes]) -> None:
    # one pass: Counter.subtract and Counter.__delitem__ are Python loops of their own
    # (177 against 68 us for an agent prompt's 280 blocks)
    for block in hashes:
        left = blocks.get(block, 0) - 1
        if left > 0:
            blocks[block] = left
        else:
            blocks.pop(block, None)


def _decode_s(state: _Replica, max_tokens: int) -> float:
    """The predicted decode of an answer there: the typical answer's, at most ``max_tokens``
    (0: no limit known) at the measured pace; 0 before any answer is measured."""
    if state.decode_samples == 0 or state.decode_tokens_avg <= 0:
        return 0.0
    typical = state.decode_seconds_avg
    if max_tokens > 0:
        typical = min(typical, max_tokens * state.decode_seconds_avg / state.decode_tokens_avg)
    return typical


def _decode_left_s(state: _Replica, started_at: float, max_tokens: int, now: float) -> float:
    """What is left of a decode that began at ``started_at``: the rest of the predicted one;
    past it (a long answer), as long again as it has run, up to its ``max_tokens`` at the
    measured pace."""
    run_s = max(now - started_at, 0.0)
    predicted = _decode_s(state, max_tokens)
    if run_s < predicted:
        return predicted - run_s
    left = run_s
    if max_tokens > 0 and state.decode_samples > 0 and state.decode_tokens_avg > 0:
        longest = max_tokens * state.decode_seconds_avg / state.decode_tokens_avg
        left = min(left, max(longest - run_s, 0.0))
    return left


def _written(prompt_tokens: int, uncached_tokens: int) -> int:
    """The KV blocks, in tokens, a prefill of ``uncached_tokens`` of a prompt of
    ``prompt_tokens`` writes: the prompt's whole blocks past the whole blocks it reused (a
    partial last block is not cached: it evicts nothing)."""
    prompt = max(prompt_tokens, 0)
    reused = max(prompt - max(uncached_tokens, 0), 0)
    return max(prompt // BLOCK_SIZE - reused // BLOCK_SIZE, 0) * BLOCK_SIZE


def _common(mine: Sequence[bytes], theirs: Sequence[bytes]) -> int:
    """Leading blocks two prompts share (chained hashes: equal from the first on)."""
    common = 0
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            break
        common += 1
    return common
