"""A KV prefix cache of chained block hashes, modelled on vLLM's automatic prefix caching.

The model replica holds the truth with it; prefix-cache keeps an approximate view of each
replica with the same hashes (so both agree on what a block is).

The prompt's token ids are cut into blocks of ``BLOCK_SIZE`` tokens; only full blocks are
cached. Each block's hash chains its parent's hash, so a block is reusable only when every
token before it matches too, and the chain starts from a root salted by tenant and model, so
two tenants (or two models) never share a block even for the same text. Eviction is LRU with
a capacity in blocks. Touching a prompt's blocks marks them tail-first, as vLLM frees them, so
under pressure the tail of a prefix is evicted before its head (a head without its tail stays
useful; a tail without its head never matches again).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.prompt import Block

BLOCK_SIZE = 16
_ROOT = b"cachemesh.kv.v1"


def block_hashes(tenant: str, model: str, token_ids: Sequence[int]) -> list[bytes]:
    """The chained hash of every full block of ``token_ids``; a partial tail block is left out."""
    return _chained(_root(tenant, model), token_ids, [])


def _root(tenant: str, model: str) -> bytes:
    return hashlib.sha256(
        b"\x00".join((_ROOT, tenant.encode("utf-8"), model.encode("utf-8")))
    ).digest()


def _chained(parent: bytes, token_ids: Sequence[int], hashes: list[bytes]) -> list[bytes]:
    """``hashes`` extended by the chained hash of every full block of ``token_ids``, the first
    chained to ``parent``."""
    # each block is its token ids as little-endian uint32s, packed once for the whole prompt
    # (a struct.pack a block cost 40% more: 371 against 219 us for an agent's 4.4k tokens)
    ids = array("I", token_ids)
    if sys.byteorder != "little":
        ids.byteswap()
    packed, step = ids.tobytes(), BLOCK_SIZE * ids.itemsize
    for start in range(0, len(packed) - step + 1, step):
        parent = hashlib.sha256(parent + packed[start : start + step]).digest()
        hashes.append(parent)
    return hashes


class KvHashMemo:
    """The KV block hashes of recent prompts, by (tenant, model, canonical digest), so that a
    prompt extending one seen before hashes only its new blocks (thread-safe).

    A canonical digest (``services.common.prompt``) names an exact sequence of canonical
    blocks, so with the model (its tokenizer) an exact sequence of token ids: the hashes
    of that prefix's full blocks are those kept. A long agent session's turn adds ~440 tokens
    to a prompt of up to 200k: ``block_hashes`` spent ~7 ms a turn re-hashing the 12k blocks it
    had hashed the turn before (15% of prefix-cache's CPU). ``hashes`` returns exactly what
    ``block_hashes`` does for the whole prompt.

    Each entry keeps its prompt's hashes (a tuple sharing the hash objects of the entries
    before it); at most ``max_hashes`` of them are held in all, least recently used out first
    (0: none kept, every prompt hashed in full).
    """

    def __init__(self, max_hashes: int) -> None:
        if max_hashes < 0:
            raise ValueError(f"max_hashes must be >= 0, got {max_hashes}")
        self._max = max_hashes
        self._held = 0
        self._entries: OrderedDict[tuple[str, str, str], tuple[int, tuple[bytes, ...]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.reused_hashes = 0  # hashes taken from an entry rather than computed

    @property
    def held_hashes(self) -> int:
        return self._held

    def hashes(
        self, tenant: str, model: str, blocks: Sequence[Block], token_ids: Sequence[int]
    ) -> list[bytes]:
        """``block_hashes(tenant, model, token_ids)``, ``token_ids`` being ``blocks``' (the
        canonical prompt's, ``prompt_token_ids``)."""
        found: tuple[bytes, ...] = ()
        with self._lock:
            tokens = len(token_ids)  # up to and including the block looked up
            for block in reversed(blocks):
                entry = self._entries.get((tenant, model, block.digest))
                if entry is not None and entry[0] == tokens:
                    self._entries.move_to_end((tenant, model, block.digest))
                    found = entry[1]
                    self.reused_hashes += len(found)
                    break
                tokens -= block.tokens
        hashes = list(found)
        parent = hashes[-1] if hashes else _root(tenant, model)
        _chained(parent, token_ids[len(hashes) * BLOCK_SIZE :], hashes)
        if blocks:
            self._keep((tenant, model, blocks[-1].digest), len(token_ids), hashes)
        return hashes

    def _keep(self, key: tuple[str, str, str], tokens: int, hashes: list[bytes]) -> None:
        if len(hashes) > self._max:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._held -= len(old[1])
            self._entries[key] = (tokens, tuple(hashes))
            self._held += len(hashes)
            while self._held > self._max:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._held -= len(dropped)


def reusable_blocks(prompt_tokens: int) -> int:
    """How many leading blocks a prompt may reuse: the last token is always computed (vLLM)."""
    return max(prompt_tokens - 1, 0) // BLOCK_SIZE


def own_reuse(read_tokens: int, prompt_tokens: int, engine_prompt_tokens: int) -> int:
    """The most of a shared engine's KV reuse that a tenant's own traffic accounts for, in
    the engine's tokens: its own read ``read_tokens`` of a prompt of ``prompt_tokens``, both
    in prefix-cache's (cl100k) tokens, scaled by the engine's count of the prompt
    (``engine_prompt_tokens``), rounded down; a read of every full block of the prompt (the
    tenant's own prompt, whole) lets the engine's reuse of every full block of its own count
    through. With one count, ``read_tokens`` as it is."""
    if read_tokens >= reusable_blocks(prompt_tokens) * BLOCK_SIZE > 0:
        return reusable_blocks(engine_prompt_tokens) * BLOCK_SIZE
    return read_tokens * engine_prompt_tokens // max(prompt_tokens, 1)


class KvBlockCache:
    """Chained block hashes in LRU order; not thread-safe (use it from the event loop)."""

    def __init__(self, capacity_blocks: int, first_touch: int = 0) -> None:
        """``first_touch``: the count touches start from (a view made again after another
        was dropped starts above the old one's, so the old one's counts are no evidence on
        it: prefix-cache's ``ReplicaViews``)."""
        if capacity_blocks < 0:  # 0 is valid: an engine with no prefix cache
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        if first_touch < 0:
            raise ValueError(f"first_touch must be >= 0, got {first_touch}")
        self._capacity = capacity_blocks
        # each block's last touch, counted up: the LRU order, as numbers one can compare later
        self._blocks: OrderedDict[bytes, int] = OrderedDict()
        self.first_touch = first_touch
        self._touches = first_touch
        self.evictions = 0

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    @property
    def touches(self) -> int:
        """The last touch's count: a block touched after now gets a larger one (``touched``)."""
        return self._touches

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """The number of leading blocks already cached. Reads only: the LRU order is unchanged."""
        matched = 0
        for block_hash in hashes:
            if block_hash not in self._blocks:
                break
            matched += 1
        return matched

    def cached_tokens(self, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Prompt tokens this replica can skip in prefill (never the whole prompt)."""
        return self.lookup(hashes[: reusable_blocks(prompt_tokens)]) * BLOCK_SIZE

    def touched(self, hashes: Sequence[bytes]) -> list[int]:
        """When each leading cached block was last touched (as ``lookup`` matches them): along a
        chain they decrease, as every touch of a block touches its parents after it."""
        stamps = []
        for block_hash in hashes:
            stamp = self._blocks.get(block_hash)
            if stamp is None:
                break
            stamps.append(stamp)
        return stamps

    def evict_touched_by(self, stamp: int) -> int:
        """Evicts every block last touched at or before ``stamp`` (``touched``): what an LRU
        cache that lost a block touched then lost with it. Returns how many went."""
        evicted = 0
        while self._blocks and next(iter(self._blocks.values())) <= stamp:
            self._blocks.popitem(last=False)
            evicted += 1
        return evicted

    def evict(self, hashes: Sequence[bytes]) -> int:
        """Evicts these blocks (those held of them), whatever their touch: a prompt shown
        lost on its own, not as an LRU loses blocks. Returns how many went."""
        evicted = 0
        for block_hash in hashes:
            if self._blocks.pop(block_hash, None) is not None:
                evicted += 1
        return evicted

    def insert(self, hashes: Sequence[bytes]) -> None:
        """Adds or touches every block of a prefilled prompt, then evicts down to capacity."""
        for block_hash in reversed(hashes):
            self._touches += 1
            self._blocks[block_hash] = self._touches
            self._blocks.move_to_end(block_hash, last=True)
        # Newest is last; the head of this prompt was touched last, so the tail goes first.
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)
            self.evictions += 1
