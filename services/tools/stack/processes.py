"""The stack's processes: spawn in their own session, pid files, signals, liveness."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.tools.stack.service_table import ServiceDef


@dataclass
class Running:
    """One service process; ``popen`` is set only in the process that started it."""

    service: ServiceDef
    pid: int
    popen: subprocess.Popen[bytes] | None = None

    def exit_code(self) -> int | None:
        """The exit code once the process has ended (-1 if it was not our child), else None."""
        if self.popen is not None:
            return self.popen.poll()
        return None if is_alive(self.pid, self.service.module) else -1

    def signal(self, signum: int) -> None:
        if self.exit_code() is not None:
            return
        try:
            if os.getpgid(self.pid) == self.pid:  # its own session: reach its children too
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


def spawn(service: ServiceDef, env: Mapping[str, str], cwd: Path, log_path: Path) -> Running:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:  # one run per log: its tail is this run's
        popen = subprocess.Popen(
            [sys.executable, "-m", service.module],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(service=service, pid=popen.pid, popen=popen)


def is_alive(pid: int, module: str) -> bool:
    """True if ``pid`` runs and (where /proc tells) its command line holds ``module`` (``python
    -m <module>``, or ``redis-server``), so a reused pid is not taken for it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: a reused pid, not ours
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    fields = proc_stat(pid)
    if fields is None:  # unreadable
        return False
    cmdline = proc / "cmdline"
    if fields[0] == "Z":  # its main thread has exited: the process, once its last thread has;
        # its command line reads empty meanwhile, a remaining thread's still holds the argv
        # (checked too: a reused pid's zombie with threads left is not ours)
        remaining = other_threads(pid)
        if not remaining:
            return False
        cmdline = proc / "task" / remaining[0] / "cmdline"
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    marker = module.encode()  # a substring: redis-server rewrites its title in place
    return any(marker in arg for arg in argv)


def other_threads(pid: int) -> list[str]:
    """The threads of ``pid`` but its main one (their ids), none where /proc does not tell: a
    zombie's (``/proc/<pid>/stat`` says Z) main thread has exited while these still exit, and
    its files and sockets close only with the last (seen: a llama-server killed with SIGKILL
    showed Z with 1-8 threads left, its port refusing a new server's bind)."""
    try:
        return [tid for tid in os.listdir(f"/proc/{pid}/task") if tid != str(pid)]
    except OSError:
        return []


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, field 22 of /proc/<pid>/stat): with the pid
    it names one process, never a later one that reused the pid. None where /proc does not tell
    (not Linux, or the process is gone)."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, from field 3 (the state: "Z"
    for a zombie; field n is at n - 3); None where it cannot be read (not Linux, or gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields or None


def write_pid(path: Path, pid: int) -> None:
    """``<pid> <start time>`` (the pid alone where /proc does not tell the start time), in
    place of what ``path`` held at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = start_time(pid)
    # whole or not at all: a reader (``status``, a test) never sees a file half written
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(f"{pid}\n" if started is None else f"{pid} {started}\n")
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk leaves no stray file behind
        raise


def read_pid(path: Path) -> int | None:
    """The pid ``path`` records if that process still runs: None when the file is missing or
    malformed, when the pid now names a process started at another time (the pid was reused
    after a crash or a reboot), or when the file records no start time on a system whose
    /proc tells it (an older runner's file: its pid may be anybody's now; ``legacy_pid``)."""
    fields = _fields(path)
    if fields is None:
        return None
    pid = int(fields[0])
    started = start_time(pid)
    if len(fields) == 1:
        return pid if started is None and not Path("/proc/self/stat").is_file() else None
    return pid if started == fields[1] else None


def recorded_pid(path: Path, ours: Callable[[int], bool]) -> tuple[int | None, int | None]:
    """(the pid of the live process ``path`` records, when ``ours`` takes it for the stack's;
    the pid an older runner's file, with no start time, records, when ``ours`` takes that
    one: neither stopped nor adopted, the caller says so). Only reads: the file's writer (the
    supervisor, ``up``) replaces it whole at any moment, and a reader that removed a file it
    judged stale removed the new one now and then; ``stop`` removes them."""
    pid = read_pid(path)
    if pid is not None and ours(pid):
        return pid, None
    legacy = legacy_pid(path)
    return None, (legacy if legacy is not None and ours(legacy) else None)


def legacy_pid(path: Path) -> int | None:
    """The pid of a file that records no start time (written by an older runner), else None."""
    fields = _fields(path)
    return int(fields[0]) if fields is not None and len(fields) == 1 else None


def _fields(path: Path) -> list[str] | None:
    try:
        fields = path.read_text().split()
    except FileNotFoundError:
        return None
    if not 1 <= len(fields) <= 2 or not all(f.isdigit() for f in fields):
        return None
    return fields


def tail(path: Path, lines: int = 40) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(content[-lines:])


def terminate_all(running: list[Running], signum: int = signal.SIGTERM) -> None:
    for item in running:
        item.signal(signum)
