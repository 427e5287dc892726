"""Passive outlier ejection (``replica_health``) on an injected clock: ejected after N
consecutive failures, one probe after the cool-off, doubled on a failed probe up to the cap,
reset on success; and its settings, validated at start-up naming the variable."""

from __future__ import annotations

import pytest

from services.common.env import ConfigError, Env
from services.router.replica_health import EjectionPolicy, ReplicaHealth
from services.router.settings import ejection_from_env

POLICY = EjectionPolicy(after_failures=3, base_s=5.0, max_s=12.0)


def _fail(health: ReplicaHealth, replica: str, now: float, times: int = 1) -> None:
    for _ in range(times):
        health.failed(replica, now, health.sending(replica, now))


def test_ejected_after_n_consecutive_failures_for_the_base_cool_off() -> None:
    health = ReplicaHealth(POLICY)
    _fail(health, "r", 0.0, 2)
    assert not health.ejected("r", 0.0)
    ejection = health.failed("r", 1.0, probe=False)
    assert ejection is not None and ejection.failures == 3 and ejection.cool_off_s == 5.0
    assert health.ejected("r", 5.9) and not health.ejected("other", 5.9)
    assert health.split(["r", "other"], 5.9) == (["other"], ["r"])


def test_one_probe_after_the_cool_off_and_its_whole_answer_brings_it_back() -> None:
    health = ReplicaHealth(POLICY)
    _fail(health, "r", 0.0, 3)
    assert not health.ejected("r", 5.0)  # the cool-off is over: due a probe
    assert health.sending("r", 5.0)  # this call is the probe ...
    assert health.ejected("r", 5.0)  # ... and no other call goes there meanwhile
    assert not health.sending("r", 5.0)
    health.succeeded("r")
    assert not health.ejected("r", 5.0)
    _fail(health, "r", 5.0, 2)  # the count restarted at the success
    assert not health.ejected("r", 5.0)


def test_a_failed_probe_ejects_again_for_twice_as_long_up_to_the_cap() -> None:
    health = ReplicaHealth(POLICY)
    _fail(health, "r", 0.0, 3)  # 5 s
    ejection = health.failed("r", 5.0, health.sending("r", 5.0))
    assert ejection is not None and ejection.cool_off_s == 10.0
    assert health.ejected("r", 14.9) and not health.ejected("r", 15.0)
    ejection = health.failed("r", 15.0, health.sending("r", 15.0))
    assert ejection is not None and ejection.cool_off_s == 12.0  # capped (not 20)


def test_a_probe_that_says_nothing_passes_its_turn_to_the_next_call() -> None:
    health = ReplicaHealth(POLICY)
    _fail(health, "r", 0.0, 3)
    probe = health.sending("r", 5.0)
    health.released("r", probe)  # the caller left, or the request was refused
    assert not health.ejected("r", 5.0) and health.sending("r", 5.0)


def test_failures_of_an_ejected_replica_do_not_extend_its_cool_off() -> None:
    health = ReplicaHealth(POLICY)
    _fail(health, "r", 0.0, 3)
    assert health.failed("r", 4.0, probe=False) is None  # a call sent with all ejected
    assert not health.ejected("r", 5.0)


def test_zero_failures_never_ejects() -> None:
    health = ReplicaHealth(EjectionPolicy(after_failures=0))
    _fail(health, "r", 0.0, 100)
    assert not health.ejected("r", 0.0)


def test_settings_are_validated_naming_the_variable() -> None:
    assert ejection_from_env(Env({})) == EjectionPolicy(3, 5.0, 300.0)
    assert ejection_from_env(Env({"ROUTER_EJECT_AFTER_FAILURES": "0"})).after_failures == 0
    with pytest.raises(ConfigError, match="ROUTER_EJECT_MAX_S"):
        ejection_from_env(Env({"ROUTER_EJECT_BASE_S": "10", "ROUTER_EJECT_MAX_S": "5"}))
    with pytest.raises(ConfigError, match="ROUTER_EJECT_AFTER_FAILURES"):
        ejection_from_env(Env({"ROUTER_EJECT_AFTER_FAILURES": "-1"}))
    with pytest.raises(ConfigError, match="ROUTER_EJECT_BASE_S"):
        ejection_from_env(Env({"ROUTER_EJECT_BASE_S": "0"}))
