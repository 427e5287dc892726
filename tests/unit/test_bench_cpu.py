"""CPU accounting of the bench from fake /proc/<pid>/stat text (no process is read)."""

from __future__ import annotations

import pytest

from services.tools.bench.gateway.cpu import CpuProbe, cpu_ticks, per_request, ticks_between


def _stat(pid: int, comm: str, utime: int, stime: int) -> str:
    # proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime ...
    return f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 10 0 0 0 {utime} {stime} 7 9 20 0 1\n"


def test_ticks_are_utime_plus_stime_even_when_the_name_holds_spaces_and_parens() -> None:
    assert cpu_ticks(_stat(42, "python3", 150, 30)) == 180
    assert cpu_ticks(_stat(42, "a) (b c", 5, 6)) == 11  # children's cutime/cstime not counted
    with pytest.raises(ValueError, match="not a /proc"):
        cpu_ticks("42 (python3) S 1")


def test_ms_per_request_of_each_service_over_a_run() -> None:
    table = {11: [100, 300], 12: [50, 70]}  # pid -> utime before, after (stime fixed)
    reads = {11: 0, 12: 0}

    def read(pid: int) -> str:
        value = table[pid][min(reads[pid], 1)]
        reads[pid] += 1
        return _stat(pid, "python3 -m services.x", value, 10)

    probe = CpuProbe({"router": 11, "model": 12}, read, ticks_per_s=100)
    before = probe.sample()
    out = per_request(ticks_between(before, probe.sample()), 400, probe.ticks_per_s)
    assert out["requests"] == 400
    assert out["seconds"] == {"router": 2.0, "model": 0.2, "total": 2.2}
    assert out["ms_per_request"] == {"router": 5.0, "model": 0.5, "total": 5.5}
    assert out["resolution_ms"] == 10.0


def test_no_request_gives_no_figure_and_mismatched_samples_are_refused() -> None:
    assert per_request({"a": 8}, 0, 100)["ms_per_request"] == {"a": None, "total": None}
    with pytest.raises(ValueError, match="different services"):
        ticks_between({"a": 1}, {"b": 2})
