"""KvBlockCache: chained block hashes, tenant salt, LRU eviction, the last-token rule."""

from __future__ import annotations

import hashlib
import struct

import pytest

from services.model.kv_cache import BLOCK_SIZE, KvBlockCache, block_hashes, reusable_blocks


def _ids(blocks: int, start: int = 0, extra: int = 0) -> list[int]:
    return list(range(start, start + blocks * BLOCK_SIZE + extra))


def test_only_full_blocks_are_hashed() -> None:
    assert len(block_hashes("t", "m", _ids(0, extra=15))) == 0
    assert len(block_hashes("t", "m", _ids(2, extra=15))) == 2
    assert len(block_hashes("t", "m", _ids(3))) == 3


def test_partial_block_is_not_cached() -> None:
    cache = KvBlockCache(100)
    prompt = _ids(1, extra=10)  # 26 tokens: one full block and a partial one
    cache.insert(block_hashes("t", "m", prompt))
    assert len(cache) == 1
    longer = [*prompt, *range(1000, 1006)]  # the partial block is now full: still a miss
    assert cache.lookup(block_hashes("t", "m", longer)) == 1


def test_change_in_block_one_invalidates_every_later_block() -> None:
    cache = KvBlockCache(100)
    prompt = _ids(4)
    cache.insert(block_hashes("t", "m", prompt))
    changed = list(prompt)
    changed[BLOCK_SIZE + 3] += 1  # a token of block 1 (0-based)
    hashes = block_hashes("t", "m", changed)
    assert cache.lookup(hashes) == 1
    # Blocks 2 and 3 hold the same tokens as before, yet their chained hashes differ.
    assert hashes[2] not in cache and hashes[3] not in cache
    assert hashes[0] in cache


def test_tenant_and_model_salt_isolate() -> None:
    cache = KvBlockCache(100)
    prompt = _ids(3)
    cache.insert(block_hashes("tenant-a", "sim-small", prompt))
    assert cache.lookup(block_hashes("tenant-a", "sim-small", prompt)) == 3
    assert cache.lookup(block_hashes("tenant-b", "sim-small", prompt)) == 0
    assert cache.lookup(block_hashes("tenant-a", "sim-large", prompt)) == 0


def test_lookup_counts_leading_blocks_only() -> None:
    cache = KvBlockCache(100)
    prompt = _ids(3)
    hashes = block_hashes("t", "m", prompt)
    cache.insert(hashes[1:])  # not the head
    assert cache.lookup(hashes) == 0


def test_lru_evicts_least_recently_used_at_capacity() -> None:
    cache = KvBlockCache(4)
    a = block_hashes("t", "m", _ids(2, start=0))
    b = block_hashes("t", "m", _ids(2, start=10_000))
    c = block_hashes("t", "m", _ids(2, start=20_000))
    cache.insert(a)
    cache.insert(b)
    cache.insert(a)  # a becomes the most recent
    cache.insert(c)  # over capacity: b goes
    assert len(cache) == 4
    assert cache.evictions == 2
    assert cache.lookup(a) == 2
    assert cache.lookup(b) == 0
    assert cache.lookup(c) == 2


def test_lookup_does_not_refresh_recency() -> None:
    cache = KvBlockCache(2)
    a = block_hashes("t", "m", _ids(1, start=0))
    b = block_hashes("t", "m", _ids(1, start=10_000))
    c = block_hashes("t", "m", _ids(1, start=20_000))
    cache.insert(a)
    cache.insert(b)
    assert cache.lookup(a) == 1  # a read is not a use
    cache.insert(c)
    assert cache.lookup(a) == 0
    assert cache.lookup(b) == 1


def test_eviction_takes_the_tail_of_a_prefix_before_its_head() -> None:
    cache = KvBlockCache(3)
    a = block_hashes("t", "m", _ids(2, start=0))
    b = block_hashes("t", "m", _ids(2, start=10_000))
    cache.insert(a)
    cache.insert(b)  # one block must go: a's tail, so a's head still matches
    assert cache.lookup(a) == 1
    assert cache.lookup(b) == 2


def test_whole_prompt_hit_still_computes_the_last_token() -> None:
    cache = KvBlockCache(100)
    prompt = _ids(2)  # exactly two full blocks
    hashes = block_hashes("t", "m", prompt)
    cache.insert(hashes)
    assert cache.lookup(hashes) == 2
    assert cache.cached_tokens(hashes, len(prompt)) == BLOCK_SIZE  # not 32: one block recomputed
    longer = _ids(2, extra=1)  # 33 tokens: both blocks reusable, the 33rd is computed
    assert cache.cached_tokens(block_hashes("t", "m", longer), len(longer)) == 2 * BLOCK_SIZE


@pytest.mark.parametrize(
    ("prompt_tokens", "blocks"), [(0, 0), (1, 0), (16, 0), (17, 1), (32, 1), (33, 2)]
)
def test_reusable_blocks(prompt_tokens: int, blocks: int) -> None:
    assert reusable_blocks(prompt_tokens) == blocks


def test_capacity_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        KvBlockCache(-1)


def test_zero_capacity_is_an_engine_without_a_prefix_cache() -> None:
    cache = KvBlockCache(0)
    hashes = block_hashes("t", "sim-large", list(range(BLOCK_SIZE * 4)))
    cache.insert(hashes)
    assert len(cache) == 0 and cache.cached_tokens(hashes, BLOCK_SIZE * 4) == 0


def test_a_block_hash_is_the_documented_chain() -> None:
    # sha256(parent + the block's ids as little-endian uint32s), from a root salted by tenant
    # and model: the format prefix-cache and the model replicas both compute
    ids = [0, 1, 65_535, 65_536, 100_255, 2**32 - 1, *range(26)]  # two full blocks and a tail
    parent = hashlib.sha256(b"cachemesh.kv.v1\x00tenant-a\x00sim-small").digest()
    expected = []
    for start in (0, BLOCK_SIZE):
        block = ids[start : start + BLOCK_SIZE]
        parent = hashlib.sha256(parent + struct.pack(f"<{BLOCK_SIZE}I", *block)).digest()
        expected.append(parent)
    assert block_hashes("tenant-a", "sim-small", ids) == expected
    with pytest.raises(OverflowError):
        block_hashes("t", "m", [-1] * BLOCK_SIZE)  # never a token id: refused, not wrapped
