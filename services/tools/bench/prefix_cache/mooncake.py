"""An arrival trace (Mooncake's format) replayed through KV-aware routing on a virtual clock.

One hash id stands for 512 tokens, i.e. 32 blocks of 16: block j of hash id h gets a key
chained from its parent's, like the engine's chained block hashes. Each replica's KV cache is
the engine's ``KvBlockCache`` (LRU, ``capacity_blocks``); prefix-cache's ``ReplicaViews`` holds
the router's view of them, and the router's own ``ReplicaChooser`` (the policy under test, with
its ``ReplicaStates``) picks the replica, fed the same reports a live router gets.

Simulated replicas: each prefills one request at a time, first come first served, at
``PREFILL_TPS`` for the tokens its cache holds no prefix of when the prefill begins; the
prefill's end is the first token (TTFT = queueing + prefill), when the replica reports
``prompt_tokens`` and ``kv_cached_tokens`` (``ReplicaStates.started``: the router measures the
replica's rate from these reports, it is not told it) and prefix-cache's view records the
prompt (the WARM commit). Decode runs alongside at ``DECODE_TPS`` tokens/s a request and only
decides how long a request stays in flight (SGLang's load).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachemesh.loadtest.stats import percentile
from services.common.kv_blocks import BLOCK_SIZE, KvBlockCache, reusable_blocks
from services.prefix_cache.replica_view import EngineReuse, ReplicaViews
from services.router.replica_choice import ChoiceSettings, ReplicaChooser, Request, TtftPolicy
from services.router.replica_state import ReplicaStates
from services.tools.bench.prefix_cache.ceiling import belady_hit_tokens

HASH_BLOCK_TOKENS = 512
PREFILL_TPS, DECODE_TPS = 25_000.0, 50.0
MODEL = "trace"
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")  # of a trace's line


@dataclass(frozen=True)
class Row:
    at_s: float
    input_tokens: int
    output_tokens: int
    keys: tuple[bytes, ...]


class TraceError(ValueError):
    """The trace cannot be replayed: the message names the file (and line) and what is wrong."""


def _count(value: object) -> bool:
    """A JSON integer >= 0 (a bool is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _row(raw: object) -> tuple[float, int, int, list[int]]:
    """A line's fields, checked: finite ``timestamp`` >= 0 (ms), integer ``input_length`` and
    ``output_length`` >= 0, ``hash_ids`` a list of integers; else a ValueError saying which."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in FIELDS if k not in raw]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    at_ms, length, output, hash_ids = (
        raw["timestamp"], raw["input_length"], raw["output_length"], raw["hash_ids"]
    )  # fmt: skip
    if not (
        isinstance(at_ms, int | float)
        and not isinstance(at_ms, bool)
        and math.isfinite(at_ms)
        and at_ms >= 0
    ):
        raise ValueError(f"timestamp must be a finite number of ms >= 0, got {at_ms!r}")
    for name, value in (("input_length", length), ("output_length", output)):
        if not _count(value):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise ValueError("hash_ids must be a list of integers")
    return float(at_ms), length, output, hash_ids


def load_trace(path: Path) -> list[Row]:
    """The trace's requests in arrival order. A file that cannot be read, holds no request, or
    has a line that is not one (its fields' types and ranges checked) is a ``TraceError``
    naming the file and line: a replay of nothing, or of a NaN or negative time, would print
    hit rates and TTFTs of 0, ``nan`` or below zero as if measured."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc})") from None
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            at_ms, length, output, hash_ids = _row(json.loads(line))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise TraceError(
                f"{path}:{number}: expected a JSON object with timestamp, input_length, "
                f"output_length and hash_ids ({exc})"
            ) from None
        full_blocks = length // BLOCK_SIZE
        keys: list[bytes] = []
        parent = b"mooncake"
        for h in hash_ids:
            for j in range(HASH_BLOCK_TOKENS // BLOCK_SIZE):
                if len(keys) == full_blocks:
                    break
                parent = hashlib.blake2b(parent + f"{h}/{j}".encode(), digest_size=16).digest()
                keys.append(parent)
        rows.append(Row(at_ms / 1000, length, output, tuple(keys)))
    if not rows:
        raise TraceError(f"{path}: no request in the trace (an empty file?)")
    rows.sort(key=lambda r: r.at_s)  # stable: equal timestamps keep the file's order
    return rows


def ideal_hit_rate(rows: list[Row]) -> float:
    """Input tokens an unbounded single replica would reuse: the ceiling of any policy."""
    seen: set[bytes] = set()
    hit = total = 0
    for row in rows:
        matched = 0
        for key in row.keys[: reusable_blocks(row.input_tokens)]:
            if key not in seen:
                break
            matched += 1
        hit += matched * BLOCK_SIZE
        total += row.input_tokens
        seen.update(row.keys)
    return round(hit / max(total, 1), 4)


def pooled_lru_hit_rate(rows: list[Row], capacity_blocks: int) -> float:
    """Input tokens one LRU cache of ``capacity_blocks`` would reuse, serving every request in
    arrival order. With ``capacity_blocks`` = n replicas' memory it is the reference for a
    router over n LRU engines of that size: their memory used as one cache, every prefix kept
    once. A router can go a little past it (n LRU caches are not one), not far."""
    cache = KvBlockCache(capacity_blocks)
    hit = total = 0
    for row in rows:
        hit += cache.cached_tokens(row.keys, row.input_tokens)
        total += row.input_tokens
        cache.insert(row.keys)
    return round(hit / max(total, 1), 4)


def admitting_lru_hit_rate(rows: list[Row], capacity_blocks: int) -> float:
    """Input tokens one LRU cache of ``capacity_blocks`` would reuse if it admitted only the
    blocks some later request uses again (knowing the future). Engines admit every block they
    prefill; the gap between this and ``pooled_lru_hit_rate`` is what one-off prompts cost by
    pushing reusable prefixes out, which no choice of replica can avoid."""
    last_use: dict[bytes, int] = {}
    for i, row in enumerate(rows):
        for key in row.keys:
            last_use[key] = i
    cache = KvBlockCache(capacity_blocks)
    hit = total = 0
    for i, row in enumerate(rows):
        hit += cache.cached_tokens(row.keys, row.input_tokens)
        total += row.input_tokens
        # chained keys: a block used again means its whole prefix is used again
        kept = sum(1 for key in row.keys if last_use[key] > i)
        cache.insert(row.keys[:kept])
    return round(hit / max(total, 1), 4)


def belady_hit_rate(rows: list[Row], capacity_blocks: int) -> float:
    """Input tokens optimal replacement (``ceiling``) reuses with ``capacity_blocks`` in all:
    with n replicas' memory, the most any router over n replicas could reach."""
    hit = belady_hit_tokens([(row.input_tokens, row.keys) for row in rows], capacity_blocks)
    return round(hit / max(sum(row.input_tokens for row in rows), 1), 4)


@dataclass
class _Job:
    row: Row
    ticket: int
    predicted_match: int


@dataclass
class _Replica:
    truth: KvBlockCache
    queue: deque[_Job] = field(default_factory=deque)
    free_at: float = 0.0  # when the prefill in progress (or the last one) ends


@dataclass
class _Tally:
    ttfts: list[float] = field(default_factory=list)
    view_errors: list[float] = field(default_factory=list)  # |view - engine| at each report
    route_errors: list[float] = field(default_factory=list)  # |routed match - engine|
    hit_tokens: int = 0
    input_tokens: int = 0


class _Sim:
    def __init__(self, names: list[str], policy: str, capacity_blocks: int) -> None:
        self.replicas = {n: _Replica(KvBlockCache(capacity_blocks)) for n in names}
        self.views = ReplicaViews(capacity_blocks)
        self.states = ReplicaStates(capacity_blocks * BLOCK_SIZE)
        # the TTFT policy knows the replicas' KV capacity (its eviction model)
        ttft = TtftPolicy(kv_capacity_tokens=capacity_blocks * BLOCK_SIZE)
        self.chooser = ReplicaChooser(ChoiceSettings(policy=policy, ttft=ttft), self.states)
        self.decoding: list[tuple[float, str]] = []  # (decode end, replica)
        self.tally = _Tally()
        self.served = dict.fromkeys(names, 0)
        self.reasons: dict[str, int] = {}

    def advance(self, now: float) -> None:
        """Every prefill that ends by ``now``: its first token, reports and view record."""
        for name, replica in self.replicas.items():
            while replica.queue:
                job = replica.queue[0]
                begin = max(job.row.at_s, replica.free_at)
                row = job.row
                cached = replica.truth.cached_tokens(row.keys, row.input_tokens)
                end = begin + (row.input_tokens - cached) / PREFILL_TPS
                if end > now:
                    break
                replica.queue.popleft()
                replica.free_at = end
                replica.truth.insert(row.keys)
                self.states.started(name, job.ticket, row.input_tokens, cached, end)
                reuse = EngineReuse(cached, row.input_tokens)  # one count: the trace's
                predicted = self.views.record(name, row.keys, row.input_tokens, reuse)
                tally = self.tally
                tally.view_errors.append(abs(predicted - cached))
                tally.route_errors.append(abs(job.predicted_match - cached))
                tally.ttfts.append(end - row.at_s)
                tally.hit_tokens += cached
                tally.input_tokens += row.input_tokens
                heapq.heappush(self.decoding, (end + row.output_tokens / DECODE_TPS, name))
        while self.decoding and self.decoding[0][0] <= now:
            self.states.release(heapq.heappop(self.decoding)[1])

    def arrive(self, row: Row) -> None:
        self.advance(row.at_s)
        names = list(self.replicas)
        request = Request(MODEL, row.input_tokens, row.keys, None)
        view = {n: self.views.match(n, row.keys, row.input_tokens) for n in names}
        route = self.chooser.choose(request, names, view, row.at_s)
        chosen = route.order[0]
        uncached = row.input_tokens - route.match_tokens
        ticket = self.states.sent(chosen, row.input_tokens, uncached, row.keys, row.at_s)
        self.replicas[chosen].queue.append(_Job(row, ticket, route.match_tokens))
        self.served[chosen] += 1
        self.reasons[route.reason] = self.reasons.get(route.reason, 0) + 1


def simulate(rows: list[Row], replicas: int, policy: str, capacity_blocks: int) -> dict[str, Any]:
    names = [f"replica-{i}" for i in range(replicas)]
    sim = _Sim(names, policy, capacity_blocks)
    for row in rows:
        sim.arrive(row)
    sim.advance(float("inf"))
    tally, served, reasons = sim.tally, sim.served, sim.reasons
    return {
        "replicas": replicas,
        "policy": policy,
        "requests": len(rows),
        "kv_hit_rate_tokens": round(tally.hit_tokens / max(tally.input_tokens, 1), 4),
        "ttft_p50_s": round(percentile(tally.ttfts, 0.50), 3),
        "ttft_p99_s": round(percentile(tally.ttfts, 0.99), 3),
        "busiest_replica_share": round(max(served.values()) / max(len(rows), 1), 4),
        "requests_per_replica": served,
        "route_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "measured_prefill_tps": {
            n: round(sim.states.rate(n, 0.0).prefill_tokens_per_s, 1) for n in names
        },
        "view_error_tokens": _errors(tally.view_errors),
        "routed_match_error_tokens": _errors(tally.route_errors),
    }


def _errors(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else 0.0
    return {"mean": round(mean, 1), "p99": percentile(values, 0.99), "max": max(values or [0])}
