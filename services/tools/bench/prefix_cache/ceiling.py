"""The most any router could reuse with a given total KV memory: Belady's optimal replacement.

Every block a request touches is an access, in arrival order; the cache holds at most
``capacity_blocks`` blocks and, knowing the future, keeps the blocks used again soonest: on a
miss the block is admitted only if its next use comes before that of some cached block (which
is evicted; else it bypasses the cache). Belady's rule maximises the hits of any replacement
over that sequence, so its hits bound the prefix hits of any router over caches of that total
size, LRU or not (a prefix hit is a block hit; n caches of c blocks are one cache of n*c that
is never fuller). Real engines cannot bypass (a prefilled prompt is cached), so the bound is
loose: it is the ceiling, not a target.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from services.common.kv_blocks import BLOCK_SIZE, reusable_blocks

NEVER = float("inf")


def belady_hit_tokens(requests: Sequence[tuple[int, Sequence[bytes]]], capacity_blocks: int) -> int:
    """Tokens hit under optimal replacement; ``requests``: (prompt tokens, block keys) in
    arrival order. Only a prompt's reusable blocks count as hits (never its last token)."""
    accesses: list[bytes] = []
    countable: list[bool] = []
    for prompt_tokens, keys in requests:
        limit = reusable_blocks(prompt_tokens)
        accesses.extend(keys)
        countable.extend(i < limit for i in range(len(keys)))
    next_use: list[float] = [NEVER] * len(accesses)
    seen: dict[bytes, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        later = seen.get(accesses[i])
        next_use[i] = NEVER if later is None else later
        seen[accesses[i]] = i
    cached: dict[bytes, float] = {}  # block -> its next use
    farthest: list[tuple[float, bytes]] = []  # (-next use, block), stale entries skipped
    hits = 0
    for i, key in enumerate(accesses):
        if key in cached:
            hits += countable[i]
        elif capacity_blocks <= 0:
            continue
        cached[key] = next_use[i]
        heapq.heappush(farthest, (-next_use[i], key))
        while len(cached) > capacity_blocks:
            negative, victim = heapq.heappop(farthest)
            if cached.get(victim) == -negative:
                del cached[victim]
    return hits * BLOCK_SIZE
