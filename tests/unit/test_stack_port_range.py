"""Free ports from CACHEMESH_FREE_PORT_RANGE: each test worker's own (services.tools.stack.ports).

A port chosen by bind(0) is released until its service binds it, and the kernel could hand it
meanwhile to another worker's process binding port 0: a clean clone's run had another worker's
gRPC server answer a stack's metrics probe (5 tests errored). In a range, the ports come from
it, skip one in use, and a bad range is refused naming the variable.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket

import pytest

from services.tools.stack import ports
from services.tools.stack.ports import PORT_RANGE_VAR, free_port, free_ports


@pytest.fixture(autouse=True)
def fresh_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """No port this worker's other tests were handed counts here as handed out lately."""
    monkeypatch.setattr(ports, "_recent", collections.deque(maxlen=ports._RECENT_LIMIT))


def _free_run(count: int) -> int:
    """The first of ``count`` consecutive ports free now (each bound, then all released): a
    range the tests below take as free (a kernel port's next ones may be another process's,
    as one was in a clean clone's run)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            low = int(probe.getsockname()[1])
        if low + count > 65_536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(low, low + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return low
    raise AssertionError(f"no {count} consecutive free ports in 100 tries")


def test_ports_come_from_the_range_and_skip_one_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_run(4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        monkeypatch.setenv(PORT_RANGE_VAR, f"{port}-{port + 3}")
        chosen = free_ports(3)
    assert len(set(chosen)) == 3 and set(chosen) <= {port + 1, port + 2, port + 3}


def test_without_the_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_RANGE_VAR, raising=False)
    assert free_port() >= 1024


@pytest.mark.parametrize("span", ["20000", "x-y", "300-200", "0-10"])
def test_a_bad_range_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, span: str
) -> None:
    monkeypatch.setenv(PORT_RANGE_VAR, span)
    with pytest.raises(ValueError, match=PORT_RANGE_VAR):
        free_port()


def test_a_port_handed_out_is_not_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """``loopback(), loopback()`` (a replica's address, then its metrics'): the first port is
    released as soon as it is chosen, so a second call starting where the first did found it
    free again (a clean clone's CI run: the replica bound it, its metrics could not)."""
    low = _free_run(3)
    monkeypatch.setenv(PORT_RANGE_VAR, f"{low}-{low + 2}")
    monkeypatch.setattr(random, "randint", lambda first, _last: first)  # each call starts at low
    chosen = [free_port(), free_port(), free_port()]
    assert sorted(chosen) == [low, low + 1, low + 2]


def test_a_range_used_up_is_an_error_naming_it_not_ports_from_outside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every port of a small range handed out lately: the next call took the kernel's choice,
    a port outside the range (28 of 130 in a review's run of a 100-port range)."""
    low = _free_run(2)
    monkeypatch.setenv(PORT_RANGE_VAR, f"{low}-{low + 1}")
    assert sorted(free_ports(2)) == [low, low + 1]
    with pytest.raises(RuntimeError, match=f"{PORT_RANGE_VAR}={low}-{low + 1}.*widen"):
        free_port()


def test_free_ports_for_a_stack_avoid_the_ports_its_settings_give_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``up --free-ports`` with no range: the kernel's ephemeral range holds the stack's own
    default ports (50051, the router's, was handed to semantic-cache: a default ``make up``
    after it found its port taken). Here a range of 24 free ports, two of them the ports the
    settings give the router and semantic-cache: neither is handed out, however often."""
    low = _free_run(24)
    monkeypatch.setenv(PORT_RANGE_VAR, f"{low}-{low + 23}")
    settings = {
        "ROUTER_LISTEN": f"127.0.0.1:{low}",
        "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{low + 1}",
    }
    for _ in range(10):
        monkeypatch.setattr(ports, "_recent", collections.deque(maxlen=ports._RECENT_LIMIT))
        overrides = ports.free_port_overrides(settings)
        handed = {int(v.rpartition(":")[2]) for v in overrides.values()}
        assert len(handed) > 10 and not handed & {low, low + 1}, (low, sorted(handed))
