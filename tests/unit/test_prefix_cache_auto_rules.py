"""OpenAI's automatic prompt caching and the self-hosted KV view, hand-computed on token ids.

OpenAI (https://platform.openai.com/docs/guides/prompt-caching): prompts of 1024 tokens or more
are cached, hits come in 128-token increments, cached input is discounted, there is no write
premium, an unused prefix is kept 5-10 minutes (300 s here), ``prompt_cache_key`` partitions.
Self-hosted (vLLM prefix caching): blocks of 16, full blocks only, chained hashes salted per
tenant, LRU eviction in a capacity of blocks. Both warm stores run the OpenAI cases.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.kv_blocks import block_hashes
from services.common.models import load_model_table
from services.prefix_cache.auto_rules import openai_boundaries, plan_openai, scope_for
from services.prefix_cache.pricing import cost_nanos
from services.prefix_cache.replica_view import EngineReuse, ReplicaViews
from services.prefix_cache.rules import Split, settle
from services.prefix_cache.warm import WarmStore

TABLE = load_model_table()
GPT4O, GPT41, GPT5 = (TABLE.models[m] for m in ("gpt-4o", "gpt-4-1", "gpt-5"))
SCOPE = ("tenant-a", "gpt-4o", "key=")


async def turn(
    store: WarmStore, ids: Sequence[int], now_ms: int, scope: tuple[str, ...] = SCOPE
) -> Split:
    plan = plan_openai(ids, GPT4O)
    hit = await store.settle(scope, plan.probes, plan.writes, now_ms)
    return settle(plan, hit.tokens if hit else 0)


def test_caching_starts_at_1024_tokens_in_128_token_increments() -> None:
    assert openai_boundaries(1023, GPT4O) == []
    assert openai_boundaries(1024, GPT4O) == [1024]
    assert openai_boundaries(2006, GPT4O)[-1] == 1920  # the documented 2006 -> 1920 example
    assert len(openai_boundaries(2006, GPT4O)) == 8  # 1024, 1152, ..., 1920


async def test_a_repeated_prompt_reads_its_longest_128_increment(warm_store: WarmStore) -> None:
    clock, ids = ManualClock(), list(range(2006))
    assert await turn(warm_store, ids, clock.now_ms()) == Split(2006, 0, 0, 0)  # no write premium
    assert await turn(warm_store, ids, clock.now_ms()) == Split(86, 0, 0, 1920)


async def test_a_shared_prefix_of_1500_tokens_reads_1408(warm_store: WarmStore) -> None:
    clock = ManualClock()
    await turn(warm_store, list(range(3000)), clock.now_ms())
    other = list(range(1500)) + [99_999] * 700  # diverges after 1500 tokens
    assert await turn(warm_store, other, clock.now_ms()) == Split(2200 - 1408, 0, 0, 1408)


async def test_prompts_under_1024_tokens_are_never_cached(warm_store: WarmStore) -> None:
    clock = ManualClock()
    for _ in range(2):
        assert await turn(warm_store, list(range(1023)), clock.now_ms()) == Split(1023, 0, 0, 0)
    assert await warm_store.count() == 0


async def test_idle_retention_300s_and_each_use_refreshes(warm_store: WarmStore) -> None:
    clock, ids = ManualClock(), list(range(1100))
    await turn(warm_store, ids, clock.now_ms())
    for _ in range(3):
        clock.advance(s=299)
        assert (await turn(warm_store, ids, clock.now_ms())).read_tokens == 1024
    clock.advance(s=300)
    assert (await turn(warm_store, ids, clock.now_ms())).read_tokens == 0


async def test_prompt_cache_key_partitions_the_cache(warm_store: WarmStore) -> None:
    clock, ids = ManualClock(), list(range(1100))
    key_a = scope_for(
        GPT4O, "tenant-a", pb.CompleteRequest(cache=pb.CacheOptions(prompt_cache_key="a"))
    )
    key_b = scope_for(
        GPT4O, "tenant-a", pb.CompleteRequest(cache=pb.CacheOptions(prompt_cache_key="b"))
    )
    other_tenant = scope_for(
        GPT4O, "tenant-b", pb.CompleteRequest(cache=pb.CacheOptions(prompt_cache_key="a"))
    )
    await turn(warm_store, ids, clock.now_ms(), key_a)
    assert (await turn(warm_store, ids, clock.now_ms(), key_b)).read_tokens == 0
    assert (await turn(warm_store, ids, clock.now_ms(), other_tenant)).read_tokens == 0
    assert (await turn(warm_store, ids, clock.now_ms(), key_a)).read_tokens == 1024


def test_cached_input_discount_is_50_75_90_percent_by_model() -> None:
    split = Split(86, 0, 0, 1920)
    assert cost_nanos(split, 0, GPT4O) == 86 * 2500 + 1920 * 1250  # 50% off
    assert cost_nanos(split, 0, GPT41) == 86 * 2000 + 1920 * 500  # 75% off
    assert cost_nanos(split, 0, GPT5) == 86 * 1250 + 1920 * 125  # 90% off


def test_self_hosted_full_blocks_of_16_and_never_the_last_token() -> None:
    views = ReplicaViews(capacity_blocks=100)
    ids = list(range(40))
    hashes = block_hashes("t", "m", ids)
    assert len(hashes) == 2  # 40 tokens: two full blocks, the partial third is not cached
    views.record("r1", hashes, 40, None)
    assert views.match("r1", hashes, 40) == 32
    assert views.match("r1", block_hashes("t", "m", ids[:33]), 33) == 32
    assert views.match("r1", block_hashes("t", "m", ids[:32]), 32) == 16  # last token computed
    assert views.match("r2", hashes, 40) == 0  # another replica holds nothing


def test_self_hosted_hashes_are_chained_and_salted_per_tenant() -> None:
    a, b = (
        block_hashes("tenant-a", "m", list(range(32))),
        block_hashes("tenant-b", "m", list(range(32))),
    )
    assert not set(a) & set(b)
    changed_head = block_hashes("tenant-a", "m", [7, *range(1, 32)])
    assert changed_head[1] != a[1]  # block 2 has the same tokens but another parent


def test_self_hosted_lru_capacity_in_blocks_evicts_tails_first() -> None:
    views = ReplicaViews(capacity_blocks=4)
    first = block_hashes("t", "m", list(range(48)))  # 3 blocks
    second = block_hashes("t", "m", list(range(1000, 1048)))  # 3 other blocks
    views.record("r", first, 49, None)
    views.record("r", second, 49, None)  # 6 > 4: first's two tail blocks go
    assert views.match("r", first, 49) == 16
    assert views.match("r", second, 49) == 48


def test_replica_reports_score_the_view() -> None:
    views = ReplicaViews(capacity_blocks=100)
    hashes = block_hashes("t", "m", list(range(64)))
    views.record("r", hashes, 65, EngineReuse(0, 65))
    # predicted 64, the replica reported 48
    assert views.record("r", hashes, 65, EngineReuse(48, 65)) == 64
    assert (views.stats.reports, views.stats.abs_error_tokens) == (2, 16)
    assert views.stats.corrections == 1  # the replica had lost the last block: corrected
