"""The Admin API's failure line (``admin_auth.AuthFailures``) is throttled by reason and the
caller's host: a misconfigured client failing once a window does not hide a brute force from
another address, and a spread one's line says how many addresses it came from."""

from __future__ import annotations

import logging

import pytest

from services.router.admin_auth import (
    AUTH_FAILED_HOSTS,
    AUTH_FAILED_LOG_EVERY_MS,
    AuthFailures,
    Reason,
    peer_host,
)

WINDOW_S = AUTH_FAILED_LOG_EVERY_MS / 1000


class Rig:
    def __init__(self) -> None:
        self.now = 0.0
        self.counted: list[Reason] = []
        self.failures = AuthFailures(lambda: self.now, self.counted.append)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cachemesh.admin"]


def test_a_brute_force_is_named_beside_a_client_failing_once_a_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, by reason alone: a cron job with a stale token failing once a window took every
    window's line (3 lines, 1,503 counted) and the 1,500 guesses from 203.0.113.7 were never
    named; now each host has its line a window, the guesses' saying how many were not logged."""
    caplog.set_level(logging.WARNING, logger="cachemesh.admin")
    rig = Rig()
    for w in range(3):
        rig.now = w * (WINDOW_S + 0.01)
        rig.failures.failed("wrong", "ListKeys", "ipv4:10.0.0.9:40000")
        for i in range(500):
            rig.now = w * (WINDOW_S + 0.01) + 0.001 * (i + 1)
            rig.failures.failed("wrong", "RotateKey", f"ipv4:203.0.113.7:{50000 + i}")
    assert len(rig.counted) == 1503
    lines = _lines(caplog)
    assert len(lines) == 6, lines
    cron = [line for line in lines if "10.0.0.9" in line]
    guesses = [line for line in lines if "203.0.113.7" in line]
    assert len(cron) == 3 and all("more since" not in line for line in cron), cron
    assert len(guesses) == 3 and "more since" not in guesses[0], guesses
    assert all("(499 more since the last such line, not logged" in g for g in guesses[1:])


def test_the_addresses_beyond_those_tracked_share_a_line_that_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At most AUTH_FAILED_HOSTS hosts a reason have their own line; the failures from the
    others share one an interval, saying from how many distinct addresses they came."""
    caplog.set_level(logging.WARNING, logger="cachemesh.admin")
    rig = Rig()
    for n in range(AUTH_FAILED_HOSTS + 40):  # each host once, within one window
        rig.failures.failed("missing", "ListKeys", f"ipv4:198.51.100.{n}:1234")
    lines = _lines(caplog)
    assert len(lines) == AUTH_FAILED_HOSTS + 1, len(lines)  # the 32, then the first beyond
    assert f"(an address beyond the {AUTH_FAILED_HOSTS} tracked)" in lines[-1], lines[-1]
    rig.now = 5.0
    for n in range(AUTH_FAILED_HOSTS):  # the tracked ones fail on: they keep their places
        rig.failures.failed("missing", "ListKeys", f"ipv4:198.51.100.{n}:1235")
    rig.now = WINDOW_S
    rig.failures.failed("missing", "ListKeys", "ipv4:198.51.100.250:1")  # beyond still
    last = _lines(caplog)[-1]
    assert "198.51.100.250" in last, last
    beyond = f"(39 more since the last such line from the addresses beyond the {AUTH_FAILED_HOSTS}"
    assert beyond in last and "40 distinct with this one" in last, last
    # another reason's hosts are its own
    rig.failures.failed("wrong", "ListKeys", "ipv4:198.51.100.251:1")
    assert _lines(caplog)[-1].endswith("from ipv4:198.51.100.251:1"), _lines(caplog)[-1]


def test_a_tracked_host_idle_a_window_gives_its_place_to_a_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host that has not failed for a window leaves its place to a new host (else 32 hosts
    seen once would leave every later one in the shared line for the life of the process);
    one that failed within the window keeps it."""
    caplog.set_level(logging.WARNING, logger="cachemesh.admin")
    rig = Rig()
    for n in range(AUTH_FAILED_HOSTS):
        rig.now = n * 0.1
        rig.failures.failed("wrong", "ListKeys", f"ipv4:192.0.2.{n}:1")
    rig.now = 1.0
    rig.failures.failed("wrong", "ListKeys", "ipv4:192.0.2.0:2")  # the oldest fails again
    rig.now = WINDOW_S + 0.15
    rig.failures.failed("wrong", "ListKeys", "ipv4:203.0.113.1:1")  # .1 idle a window: gives
    assert _lines(caplog)[-1].endswith("from ipv4:203.0.113.1:1"), _lines(caplog)[-1]
    rig.failures.failed("wrong", "ListKeys", "ipv4:203.0.113.2:1")  # .2 failed 9.95 s ago
    assert "beyond" in _lines(caplog)[-1], _lines(caplog)[-1]
    rig.now = WINDOW_S + 0.25
    rig.failures.failed("wrong", "ListKeys", "ipv4:203.0.113.3:1")  # .2 idle now: gives
    assert _lines(caplog)[-1].endswith("from ipv4:203.0.113.3:1"), _lines(caplog)[-1]
    rig.failures.failed("wrong", "ListKeys", "ipv4:192.0.2.0:3")  # kept its place: throttled
    assert not _lines(caplog)[-1].endswith(":3"), _lines(caplog)[-1]


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.9:40000", "ipv4:10.0.0.9"),
        ("ipv6:[::1]:5000", "ipv6:[::1]"),
        ("ipv6:[2001:db8::7]:443", "ipv6:[2001:db8::7]"),
        ("unix:/tmp/router.sock", "unix:/tmp/router.sock"),
        ("", ""),
    ],
)
def test_a_peers_host_is_its_address_without_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host
