"""make bench-prefix's ceiling: Belady's optimal replacement on hand-made access sequences."""

from __future__ import annotations

from services.tools.bench.prefix_cache import mooncake
from services.tools.bench.prefix_cache.ceiling import belady_hit_tokens


def _one_block(*names: str) -> list[tuple[int, list[bytes]]]:
    # one 16-token block and a last token each: the block is reusable
    return [(17, [name.encode()]) for name in names]


def _rows(requests: list[tuple[int, list[bytes]]]) -> list[mooncake.Row]:
    return [mooncake.Row(float(i), n, 1, tuple(keys)) for i, (n, keys) in enumerate(requests)]


def test_optimal_replacement_keeps_what_comes_back_soonest() -> None:
    # A B C A B C: LRU in two blocks always evicts the block needed next (no hit); knowing
    # the future, C bypasses the cache (it comes back last), so A and B hit and C misses
    requests = _one_block("A", "B", "C", "A", "B", "C")
    assert mooncake.pooled_lru_hit_rate(_rows(requests), 2) == 0
    assert belady_hit_tokens(requests, 2) == 2 * 16
    assert belady_hit_tokens(requests, 3) == 3 * 16  # everything fits: every reuse hits
    assert belady_hit_tokens(requests, 1) == 1 * 16  # A is kept; B and C bypass
    assert belady_hit_tokens(requests, 0) == 0


def test_the_last_token_is_never_a_hit() -> None:
    # 32 tokens = 2 blocks, but the last token is always computed: only the first is reusable
    keys = [b"x", b"y"]
    assert belady_hit_tokens([(32, keys), (32, keys)], 10) == 16


def test_the_ceiling_bounds_lru_and_reaches_the_ideal_when_memory_is_unbounded() -> None:
    rows = [
        mooncake.Row(float(i), 17 + 16 * (i % 3), 1, tuple(f"{k}".encode() for k in keys))
        for i, keys in enumerate([[1, 2], [3], [1, 2, 4], [5, 6], [3], [1], [5, 6, 7]])
    ]
    for capacity in (1, 2, 3, 4):
        assert mooncake.belady_hit_rate(rows, capacity) >= mooncake.pooled_lru_hit_rate(
            rows, capacity
        )
    assert mooncake.belady_hit_rate(rows, 1000) == mooncake.ideal_hit_rate(rows)


def test_admitting_only_reused_blocks_keeps_them_through_one_off_prompts() -> None:
    # A, then two one-off prompts, then A again: LRU in two blocks lets the one-offs push A
    # out; admitting only blocks used again keeps A, and Belady does no better here
    requests = _one_block("A", "X", "Y", "A")
    rows = _rows(requests)
    assert mooncake.pooled_lru_hit_rate(rows, 2) == 0
    assert mooncake.admitting_lru_hit_rate(rows, 1) == round(16 / (4 * 17), 4)
    assert belady_hit_tokens(requests, 1) == 16
    # nothing is used again: nothing is admitted, nothing hits
    assert mooncake.admitting_lru_hit_rate(_rows(_one_block("A", "B", "C")), 2) == 0


def test_admitting_lru_lies_between_lru_and_the_ideal() -> None:
    rows = [
        mooncake.Row(float(i), 17 + 16 * (i % 3), 1, tuple(f"{k}".encode() for k in keys))
        for i, keys in enumerate([[1, 2], [3], [1, 2, 4], [5, 6], [3], [1], [5, 6, 7]])
    ]
    for capacity in (1, 2, 3, 4):
        admitting = mooncake.admitting_lru_hit_rate(rows, capacity)
        assert mooncake.pooled_lru_hit_rate(rows, capacity) <= admitting
        assert admitting <= mooncake.belady_hit_rate(rows, capacity)
    assert mooncake.admitting_lru_hit_rate(rows, 1000) == mooncake.ideal_hit_rate(rows)
