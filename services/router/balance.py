"""Replica choice for L3: cache affinity unless it would overload a replica (SGLang's rule).

SGLang's cache-aware router (https://docs.sglang.ai/advanced_features/router.html): the system
is imbalanced when ``max_load - min_load > balance_abs_threshold`` and
``max_load > balance_rel_threshold * min_load``; then the request goes to the shortest queue.
Otherwise it goes to the replica with the longest warm prefix when that prefix covers more
than ``cache_threshold`` of the prompt; below it, to the least loaded replica (SGLang then picks
the replica with the most free cache; the router does not know free cache, so it balances).

The load is what the router itself knows exactly: the requests it has in flight on each
replica (from the model call's start until its end), not the replica's own queue, which would
also count other routers' requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The largest balance_rel_threshold (ROUTER_BALANCE_REL_THRESHOLD): one replica carrying a
# thousand times another's load is imbalanced at any setting; past it the rule only ever fires
# with an idle replica (1e23 was taken).
MAX_LOAD_RATIO = 1000.0


@dataclass(frozen=True)
class BalancePolicy:
    abs_threshold: int = 64  # SGLang's default balance_abs_threshold
    rel_threshold: float = 1.5  # SGLang's default balance_rel_threshold
    cache_threshold: float = 0.3  # SGLang's default cache_threshold


@dataclass(frozen=True)
class Route:
    order: tuple[str, ...]  # the chosen replica first, then the fallbacks by warm prefix
    match_tokens: int  # the chosen replica's predicted warm prefix
    reason: str  # why (policies name theirs: replica_choice.REASONS), or fallback
    load: int  # the chosen replica's in-flight requests before this one
    predicted_ttft_s: float | None = None  # the TTFT policy's prediction for the chosen one
    queued_s: float | None = None  # prefill queued ahead of it there (TTFT policy)
    ejected: tuple[str, ...] = ()  # replicas left out for their failures (replica_health)
    probe: bool = False  # the call is the chosen replica's probe after its cool-off


def is_imbalanced(loads: Sequence[int], policy: BalancePolicy) -> bool:
    if not loads:
        return False
    high, low = max(loads), min(loads)
    return high - low > policy.abs_threshold and high > policy.rel_threshold * low


def choose(
    candidates: Sequence[tuple[str, int]],
    loads: Mapping[str, int],
    prompt_tokens: int,
    policy: BalancePolicy,
) -> Route:
    """``candidates`` are (replica, warm prefix tokens), best first; never empty."""
    if not candidates:
        raise ValueError("no replica to choose from")
    load = {replica: loads.get(replica, 0) for replica, _ in candidates}
    match = dict(candidates)
    best = max(candidates, key=lambda c: (c[1], -load[c[0]]))[0]
    least = min(candidates, key=lambda c: (load[c[0]], -c[1]))[0]
    if is_imbalanced(list(load.values()), policy):
        chosen, reason = least, "shortest_queue"
    elif prompt_tokens > 0 and match[best] / prompt_tokens > policy.cache_threshold:
        chosen, reason = best, "cache_affinity"
    else:
        chosen, reason = least, "least_loaded"
    rest = sorted((r for r, _ in candidates if r != chosen), key=lambda r: (-match[r], load[r]))
    return Route((chosen, *rest), match[chosen], reason, load[chosen])


class LoadTracker:
    """Requests in flight per replica, as this router sees them (one event loop: no lock)."""

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    def snapshot(self) -> dict[str, int]:
        return dict(self._inflight)

    def acquire(self, replica: str) -> None:
        self._inflight[replica] = self._inflight.get(replica, 0) + 1

    def release(self, replica: str) -> None:
        left = self._inflight.get(replica, 0) - 1
        if left > 0:
            self._inflight[replica] = left
        else:
            self._inflight.pop(replica, None)
