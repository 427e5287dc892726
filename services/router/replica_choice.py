"""Which replica serves a model call (L3): the configured policy over the replicas' warm
prefixes and queues. The router's dispatcher and ``make bench-prefix``'s replay both call it.

``ttft`` (the default): each replica's time to first token for this request is predicted as
the prefill queued ahead of it there plus the prefill of the prompt minus that replica's warm
prefix, both at the replica's measured prefill rate (``replica_state``). Ahead of it is what
the replica's tenant-fair queue serves first (``ReplicaStates.queued_s``): the call in
progress, the request's tenant's own, and about one quantum of each other tenant's backlog
(deficit round robin, its deficits taken as none), so one tenant's flood on the replica that
holds another's prefix does not steer that tenant's light request away from it; on a replica
that leaves its calls to its engine's order (no gate: vLLM, SGLang, a hosted provider), every
call sent before it, whoever's, as that engine serves them (``ReplicaStates.queue_reported``,
the dispatcher's ``expects_fair_queue``). The choice minimises
that prediction plus the prefill the choice adds times the requests that will wait behind it
(``work_weight`` times the replicas' mean queue, in requests): idle replicas make it the
fastest first token, a backlog makes reuse count (under overload the total prefill decides
every queue; reason ``save_work`` when that keeps a request off the fastest replica). Within
a near-tie of the best (``tie_fraction`` of its TTFT, at least ``tie_floor_s``) the longest
prefix wins. A hot prefix is not pinned to one replica: once its replica's queue costs more
than prefilling the prefix elsewhere, the request goes elsewhere and the prefix is replicated
there (``replicate_prefix``). Nor on a batching engine (vLLM, SGLang, the simulator), whose
answers decoding never show in its prefill queue, so the replica holding a hot prefix would stay
the fastest prediction however many calls it carries: when the replica chosen carries requests
in flight imbalanced against the least loaded replica's by SGLang's own test and thresholds
(``balance.is_imbalanced``: more than ``abs_threshold`` apart and ``rel_threshold`` times as
many; ``ROUTER_BALANCE_ABS_THRESHOLD`` / ``_REL_THRESHOLD``, 64 and 1.5), the choice is made the
same way among the replicas that are not and prefill at least 1 / ``rel_threshold`` as fast
(``load_imbalance``), which replicates the prefix there; a faster replica carries more by
right, and a slower one would make the request pay more than affinity saves. With the
replicas' KV capacity (``kv_capacity_tokens``) a warm prefix counts only if the replica will
still hold it when the request runs
(``ReplicaStates.surviving_match``: under a deep queue the view's prefixes are evicted first).

``sglang``: SGLang's cache-aware rule (``balance.choose``); ``round_robin``: the replicas in
turn, ignoring caches. Both stay for comparison (``ROUTER_REPLICA_POLICY``).

A replica's warm prefix is the longer of prefix-cache's view and the prompts queued there not
yet prefilled (they will be by the time this request runs), for every policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.router.balance import BalancePolicy, Route, choose, is_imbalanced
from services.router.replica_health import EjectionPolicy
from services.router.replica_state import ReplicaStates, check_kv_capacity

POLICIES = ("ttft", "sglang", "round_robin")
# every reason a route may carry, by policy (``fallback``: the chosen replica failed first)
REASONS = {
    "ttft": (
        "ttft_warm",
        "ttft_cold",
        "affinity_tie",
        "replicate_prefix",
        "save_work",
        "load_imbalance",
    ),
    "sglang": ("cache_affinity", "shortest_queue", "least_loaded"),
    "round_robin": ("round_robin",),
}


# The largest ``work_weight`` (ROUTER_TTFT_WORK_WEIGHT): the prefill a choice adds counted a
# hundred times the mean queue already makes the work decide every choice (0.5 to 2 measured
# in the README's replay); 1e23 was taken.
MAX_WORK_WEIGHT = 100.0


@dataclass(frozen=True)
class TtftPolicy:
    tie_fraction: float = 0.0  # a near-tie: within this fraction of the fastest prediction ...
    tie_floor_s: float = 0.02  # ... or 20 ms, whichever is larger
    # the weight of the prefill a choice adds times the requests that will wait behind it
    # (the replicas' mean queue length in requests): 0 is the greedy per-request TTFT
    work_weight: float = 1.0
    # each replica's KV cache in tokens: a warm prefix counts only if the replica will still
    # hold it when the request runs (None: no eviction model, every warm prefix counts)
    kv_capacity_tokens: int | None = None
    # the prefill rate assumed for a replica that has not reported yet, when the model's row
    # gives none (a simulated row's prefill_tokens_per_s, or prior_prefill_tokens_per_s)
    prior_prefill_tps: float = 10_000.0

    def __post_init__(self) -> None:
        check_kv_capacity(self.kv_capacity_tokens)


@dataclass(frozen=True)
class ChoiceSettings:
    policy: str = "ttft"
    sglang: BalancePolicy = field(default_factory=BalancePolicy)
    ttft: TtftPolicy = field(default_factory=TtftPolicy)
    # which replicas the dispatcher leaves out after consecutive failures (replica_health)
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclass(frozen=True)
class Request:
    """What the chooser knows of the request: its prompt's size and KV block hashes, and
    whose it is (its turn in a replica's tenant-fair queue; requests that name no tenant are
    all one tenant's, as ``ReplicaStates.sent``'s)."""

    model: str
    prompt_tokens: int
    hashes: Sequence[bytes]
    prior_prefill_tps: float | None  # the model row's prior rate (None: the global prior)
    tenant: str = ""


class ReplicaChooser:
    def __init__(self, settings: ChoiceSettings, states: ReplicaStates) -> None:
        self._settings = settings
        self.states = states
        self._turn: dict[str, int] = {}

    @property
    def policy(self) -> str:
        return self._settings.policy

    def prior(self, request: Request) -> float:
        prior = request.prior_prefill_tps
        return prior if prior is not None and prior > 0 else self._settings.ttft.prior_prefill_tps

    def choose(
        self,
        request: Request,
        replicas: Sequence[str],
        view_match: Mapping[str, int],
        now: float,
    ) -> Route:
        """``replicas`` in configured order (never empty); ``view_match``: prefix-cache's
        predicted warm prefix per replica (absent = 0)."""
        if not replicas:
            raise ValueError("no replica to choose from")
        # the replicas in turn: round robin's order, and the others' order among exact ties
        turn = self._turn.get(request.model, 0)
        self._turn[request.model] = turn + 1
        start = turn % len(replicas)
        replicas = (*replicas[start:], *replicas[:start])
        if self._settings.policy == "ttft" and self.states.kv_capacity_tokens is not None:
            match = {r: self._surviving(request, r, view_match.get(r, 0)) for r in replicas}
        else:
            match = {
                r: max(
                    view_match.get(r, 0),
                    self.states.pending_match(r, request.hashes, request.prompt_tokens),
                )
                for r in replicas
            }
        if self._settings.policy == "round_robin":
            first = replicas[0]
            return Route(replicas, match[first], "round_robin", self.states.loads().get(first, 0))
        if self._settings.policy == "sglang":
            ranked = sorted(replicas, key=lambda r: -match[r])  # stable: ties keep the turn
            return choose(
                [(r, match[r]) for r in ranked],
                self.states.loads(),
                request.prompt_tokens,
                self._settings.sglang,
            )
        return self._ttft(request, replicas, match, now)

    def predicted_ttft_s(self, request: Request, replica: str, match: int, now: float) -> float:
        """The TTFT policy's prediction for ``replica`` with a warm prefix of ``match``: the
        prefill queued there plus the prompt's uncached prefill, at its measured rate."""
        rate = self.states.rate(replica, self.prior(request)).prefill_tokens_per_s
        queued = self._queued_s(request, replica, match, rate, now)
        return queued + self._uncached(request, match) / rate

    def _queued_s(
        self, request: Request, replica: str, match: int, rate: float, now: float
    ) -> float:
        """The prefill ahead of the request there, as the replica's fair queue serves it."""
        return self.states.queued_s(
            replica,
            rate,
            now,
            tenant=request.tenant,
            prompt_tokens=request.prompt_tokens,
            uncached_tokens=self._uncached(request, match),
        )

    @staticmethod
    def _uncached(request: Request, match: int) -> int:
        return max(request.prompt_tokens - match, 0)

    def _surviving(self, request: Request, replica: str, view: int) -> int:
        """The warm prefix the replica will still hold when this request's prefill begins
        (``ReplicaStates.surviving_match``): prefix-cache's view, capped by the prompts this
        router saw it prefill recently enough once its record reaches back a whole capacity
        (before that, as after a restart, the view stands), or a queued prompt's."""
        queued, held = self.states.surviving_match(replica, request.hashes, request.prompt_tokens)
        return max(queued, view if held is None else min(view, held))

    def _ttft(
        self, request: Request, replicas: Sequence[str], match: Mapping[str, int], now: float
    ) -> Route:
        prior, policy = self.prior(request), self._settings.ttft
        queued: dict[str, float] = {}
        ttft: dict[str, float] = {}
        rates: dict[str, float] = {}
        for r in replicas:
            rate = rates[r] = self.states.rate(r, prior).prefill_tokens_per_s
            queued[r] = self._queued_s(request, r, match[r], rate, now)
            ttft[r] = queued[r] + self._uncached(request, match[r]) / rate
        # Prefill added to a replica delays the requests that queue behind it; the shortest
        # queue first takes the new arrivals, so the delay is shared by all replicas (1/n of
        # the prefill each) over the arrivals until the backlog drains, about n times a
        # replica's mean queue (Little's law): the prefill counts the mean queue's length over
        # again (``work_weight``), at the replicas' mean rate; an idle system adds nothing.
        counts = [self.states.queued_requests(r) for r in replicas]
        behind = policy.work_weight * sum(counts) / len(counts)
        shared_rate = sum(rates.values()) / len(rates)  # JSQ spreads the work over them all
        cost = {
            r: ttft[r] + behind * self._uncached(request, match[r]) / shared_rate for r in replicas
        }
        fastest = min(replicas, key=lambda r: ttft[r])
        loads = self.states.loads()
        chosen = _pick(replicas, ttft, cost, match, loads, policy)
        # the guard against one replica taking all of a hot prefix: on a batching engine the
        # answers decoding there never show in its prefill queue, so the replica holding the
        # prefix stays the fastest prediction however many calls it carries; once its
        # requests in flight are imbalanced against the least loaded replica's (SGLang's
        # test and thresholds), the choice is made among the replicas that are not
        # -- among replicas about as fast: a replica prefilling ``rel_threshold`` times as
        # fast carries that much more in flight by right, and a slower one would make the
        # request pay more than affinity saves (20,000 against 1,000 tokens/s: 28 of 1,200
        # cold prompts sent to the slow one, TTFT p99 0.20 -> 60 s)
        least = min(loads.get(r, 0) for r in replicas)
        floor = rates[chosen] / self._settings.sglang.rel_threshold
        balanced = [
            r
            for r in replicas
            if not self._imbalanced(loads.get(r, 0), least) and rates[r] >= floor
        ]
        guarded = chosen not in balanced and bool(balanced)
        if guarded:
            chosen = _pick(balanced, ttft, cost, match, loads, policy)
        longest = max(match.values())
        if guarded:
            reason = "load_imbalance"
        elif longest == 0:
            reason = "ttft_cold"
        elif match[chosen] < longest:
            reason = "replicate_prefix"
        elif chosen != fastest and ttft[chosen] > near_ttft(ttft[fastest], policy):
            reason = "save_work"
        elif chosen != fastest:
            reason = "affinity_tie"
        else:
            reason = "ttft_warm"
        rest = sorted((r for r in replicas if r != chosen), key=lambda r: ttft[r])
        return Route(
            (chosen, *rest),
            match[chosen],
            reason,
            loads.get(chosen, 0),
            predicted_ttft_s=ttft[chosen],
            queued_s=queued[chosen],
        )

    def _imbalanced(self, load: int, least: int) -> bool:
        """A replica carrying ``load`` requests in flight against the least loaded one's
        ``least`` is imbalanced by SGLang's rule (``balance.is_imbalanced``, with the
        ``sglang`` policy's thresholds: ``ROUTER_BALANCE_ABS_THRESHOLD`` and
        ``ROUTER_BALANCE_REL_THRESHOLD``)."""
        return is_imbalanced([load, least], self._settings.sglang)


def _pick(
    candidates: Sequence[str],
    ttft: Mapping[str, float],
    cost: Mapping[str, float],
    match: Mapping[str, int],
    loads: Mapping[str, int],
    policy: TtftPolicy,
) -> str:
    """The TTFT policy's choice among ``candidates`` (never empty): the least cost; within a
    near-tie of it, the longest prefix, then the fewest requests in flight."""
    cheapest = min(candidates, key=lambda r: cost[r])
    # a near-tie is measured on the TTFT, not the cost: the work term the replicas share
    # (every cold prompt's) must not widen it
    near = cost[cheapest] + max(policy.tie_floor_s, policy.tie_fraction * ttft[cheapest])
    # the longest prefix among the near-ties; then the fewest requests in flight, which
    # spreads cold prompts (and the evictions they cause) instead of filling one cache
    return max(
        (r for r in candidates if cost[r] <= near),
        key=lambda r: (match[r], -loads.get(r, 0), -cost[r]),
    )


def near_ttft(fastest_s: float, policy: TtftPolicy) -> float:
    """The largest prediction still a near-tie of ``fastest_s``."""
    return fastest_s + max(policy.tie_floor_s, policy.tie_fraction * fastest_s)
