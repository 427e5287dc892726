"""A replica taken out of the routers' MODEL_REPLICAS (moved, scaled down, a pod with a new
address) is never named again: its L3 view (up to the capacity in blocks, ~12 MB at the
default) was kept for the life of prefix-cache (six rollouts of two replicas: 12 views,
145 MB, for 2 live ones). A view no Plan named and no WARM served on for
PREFIX_CACHE_REPLICA_IDLE_S is dropped; one in use stays. Time is the injected ManualClock."""

from __future__ import annotations

import pytest

from cachemesh.envfile import read_env_file
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.kv_blocks import BLOCK_SIZE
from services.prefix_cache.replica_view import EngineReuse, ReplicaViews
from services.prefix_cache.settings import PrefixCacheSettings
from tests.unit.test_config_start_refusals import ROOT, SECRETS

IDLE_MS = 3_600_000
PROMPT = [bytes([i]) * 32 for i in range(8)]  # a prompt of 8 full blocks
TOKENS = len(PROMPT) * BLOCK_SIZE + 1


def _views(clock: ManualClock) -> ReplicaViews:
    return ReplicaViews(1024, clock=clock, idle_ms=IDLE_MS)


def test_the_views_of_replicas_taken_out_are_dropped_and_the_live_ones_kept() -> None:
    clock = ManualClock()
    views = _views(clock)
    for rollout in range(6):  # each rollout replaces both replicas with new addresses
        live = [f"10.0.{rollout}.{r}:50052" for r in range(2)]
        for _ in range(60):  # an hour of traffic, a request a minute on each
            for replica in live:
                assert views.match(replica, PROMPT, TOKENS) in (0, len(PROMPT) * BLOCK_SIZE)
                views.record(replica, PROMPT, TOKENS, None)
            clock.advance(s=60)
        assert views.replicas <= 4, rollout  # the live two, and the two taken out this hour
    assert views.replicas == 2
    assert all(views.match(r, PROMPT, TOKENS) == len(PROMPT) * BLOCK_SIZE for r in live)


def test_a_replica_a_plan_still_names_keeps_its_view_without_warms() -> None:
    """A Plan naming the replica (a candidate the router did not choose) keeps its view."""
    clock = ManualClock()
    views = _views(clock)
    views.record("kept", PROMPT, TOKENS, None)
    views.record("gone", PROMPT, TOKENS, None)
    for _ in range(3):
        clock.advance(ms=IDLE_MS - 1)
        assert views.match("kept", PROMPT, TOKENS) == len(PROMPT) * BLOCK_SIZE
    views.record("other", PROMPT, TOKENS, None)
    assert views.match("gone", PROMPT, TOKENS) == 0 and views.replicas == 2


def test_without_a_clock_no_view_is_dropped() -> None:
    """The offline tools' views (no clock) keep every replica's, as before."""
    views = ReplicaViews(1024)
    views.record("a", PROMPT, TOKENS, None)
    views.record("b", PROMPT, TOKENS, None)
    assert views.replicas == 2


def test_the_idle_setting_is_read_and_0_refused() -> None:
    shipped = {**read_env_file(ROOT / ".env"), **SECRETS}
    assert PrefixCacheSettings.from_env(Env(shipped)).replica_idle_s == 86400
    with pytest.raises(ConfigError) as caught:
        PrefixCacheSettings.from_env(Env({**shipped, "PREFIX_CACHE_REPLICA_IDLE_S": "0"}))
    assert "PREFIX_CACHE_REPLICA_IDLE_S" in str(caught.value)
    with pytest.raises(ValueError, match="idle_ms"):
        ReplicaViews(1024, clock=ManualClock(), idle_ms=0)


def _served(views: ReplicaViews, replica: str, seeds: range) -> None:
    for seed in seeds:
        views.record(replica, _prompt(seed), TOKENS, None)


def _prompt(seed: int) -> list[bytes]:
    return [bytes([seed, i]) * 16 for i in range(len(PROMPT))]


def test_a_late_final_of_a_dropped_view_leaves_the_new_view_alone() -> None:
    """A WARM's note on a view dropped as idle, scored at its FINAL after the replica was named
    again: its stamps (the dropped view's) were compared with the NEW view's and wiped it (the
    review's view_wipe.py: predicted 64 -> 0, 20 blocks corrected; the next turns billed their
    reused prefix at the input price). Each view has its own epoch: another's note is scored,
    never applied."""
    clock = ManualClock()
    views = _views(clock)
    _served(views, "r1", range(30))
    since = views.mark("r1")
    noted = views.record("r1", _prompt(29), TOKENS, None, awaiting=("A", "X"), since=since)
    assert noted == len(PROMPT) * BLOCK_SIZE
    clock.advance(ms=IDLE_MS + 1)
    views.record("r2", PROMPT, TOKENS, None)  # r1's view dropped as idle
    assert views.replicas == 1
    _served(views, "r1", range(200, 205))  # r1 named again: a new view
    held = views.match("r1", _prompt(204), TOKENS)
    assert held == len(PROMPT) * BLOCK_SIZE
    views.report(("A", "X"), EngineReuse(0, TOKENS))  # X's FINAL: the engine reused nothing
    assert views.match("r1", _prompt(204), TOKENS) == held
    assert views.stats.corrected_blocks == 0 and views.stats.reports == 1


def test_an_old_plan_s_mark_is_no_evidence_on_a_new_view() -> None:
    """A Plan's mark of a view since dropped, used by its WARM on the replica's new view (a
    report at the first token): the old view's count of touches, above the new view's, made
    every block of the new one evidence, and a report of 0 wiped it."""
    clock = ManualClock()
    views = _views(clock)
    _served(views, "r1", range(30))
    since = views.mark("r1")  # the Plan, on the old view
    clock.advance(ms=IDLE_MS + 1)
    views.record("r2", PROMPT, TOKENS, None)  # r1's view dropped
    _served(views, "r1", range(200, 205))
    held = views.match("r1", _prompt(204), TOKENS)
    views.record("r1", _prompt(204), TOKENS, EngineReuse(0, TOKENS), since=since)
    assert views.match("r1", _prompt(203), TOKENS) == held
    assert views.stats.corrected_blocks == 0


def test_an_idle_time_below_the_plan_ttl_is_refused_naming_both() -> None:
    """A replica's view dropped while a Plan that named it still waits for its WARM."""
    shipped = {**read_env_file(ROOT / ".env"), **SECRETS}
    low = {**shipped, "PREFIX_CACHE_REPLICA_IDLE_S": "599", "PREFIX_CACHE_PLAN_TTL_S": "600"}
    with pytest.raises(ConfigError) as caught:
        PrefixCacheSettings.from_env(Env(low))
    assert "PREFIX_CACHE_REPLICA_IDLE_S" in str(caught.value)
    assert "PREFIX_CACHE_PLAN_TTL_S" in str(caught.value)
    off = {**low, "PREFIX_CACHE_PLAN_TTL_S": "0"}  # no Plan kept: any idle time
    assert PrefixCacheSettings.from_env(Env(off)).replica_idle_s == 599
    same = {**low, "PREFIX_CACHE_REPLICA_IDLE_S": "600"}
    assert PrefixCacheSettings.from_env(Env(same)).replica_idle_s == 600
