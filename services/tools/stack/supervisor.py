"""The stack's supervisor: keeps every managed process running, as compose's ``restart:
unless-stopped`` does for the containers.

``Stack.start`` writes the plan (``<run_dir>/supervisor.json``: each process's argv,
environment, log and pid file) and starts ``python -m services.tools.stack supervise`` in a
session of its own. The supervisor adopts a process whose pid file names a live one (so ``make
up`` brings back only what is missing while the rest runs), spawns the others, and polls:
a process that has exited is started again after a backoff (``RESTART_BACKOFF_S``, doubling
up to ``RESTART_BACKOFF_MAX_S``; back to the first step once a run has lasted
``STABLE_AFTER_S``; a process that cannot be started at all is tried again the same way),
each exit and restart one line in ``logs/supervisor.log``. Its state
(pids, restarts, last exit codes) is in ``<run_dir>/supervisor-state.json`` for ``up`` and
``status``. A process named in ``<run_dir>/held/`` (``Stack.stop_service``, ``stop NAME``) is
stopped and kept stopped, as ``docker compose stop`` does, until ``up`` clears the hold.
SIGTERM stops the processes (callers before the services they call, SIGKILL after
the grace), removes their pid files and exits; with ``--exit-with`` it does so also when that
process (the test run that started it) is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from services.tools.stack import processes
from services.tools.stack.redis_process import probe_redis

PLAN_FILE = "supervisor.json"
STATE_FILE = "supervisor-state.json"
PID_NAME = "supervisor"
HELD_DIR = "held"  # an empty file per process the supervisor keeps stopped
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0
_POLL_S = 0.1


@dataclass(frozen=True)
class Managed:
    """One process the supervisor keeps running."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: str
    pid_path: str
    marker: str  # a string of its command line (``is_alive`` tells a reused pid from it)
    stop_wave: int  # lower waves stop first (a caller before the services it calls)
    # started first, and the others only once it answers PING here (the stack's Redis),
    # authenticated with this password
    redis_address: str = ""
    redis_password: str = ""
    umask: int = -1  # the process's umask (-1: the supervisor's own); Redis's files: 0600


@dataclass(frozen=True)
class Plan:
    cwd: str
    grace_s: float
    managed: list[Managed]

    def write(self, run_dir: Path) -> None:
        """Mode 0600 (the environments hold the internal credential and the Redis URLs their
        password), replaced atomically."""
        path = run_dir / PLAN_FILE
        tmp = path.with_name(f".{PLAN_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle)
        os.replace(tmp, path)

    @classmethod
    def read(cls, run_dir: Path) -> Plan:
        raw = json.loads((run_dir / PLAN_FILE).read_text())
        return cls(raw["cwd"], float(raw["grace_s"]), [Managed(**m) for m in raw["managed"]])


@dataclass
class Backoff:
    """The delay before the next restart of one process."""

    first_s: float = RESTART_BACKOFF_S
    max_s: float = RESTART_BACKOFF_MAX_S
    stable_after_s: float = STABLE_AFTER_S
    failures: int = 0

    def after_exit(self, ran_s: float) -> float:
        if ran_s >= self.stable_after_s:
            self.failures = 0
        delay: float = min(self.max_s, self.first_s * 2.0**self.failures)
        self.failures += 1
        return delay


@dataclass
class _Slot:
    spec: Managed
    pid: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    held_since: float | None = None  # when its hold was seen (SIGTERM sent, SIGKILL after grace)
    exits: int = 0
    last_exit: int | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def exit_code(self) -> int | None:
        if self.pid is None:
            return -1
        if self.popen is not None:
            return self.popen.poll()
        return None if processes.is_alive(self.pid, self.spec.marker) else -1


class Supervisor:
    def __init__(self, plan: Plan, run_dir: Path, out: TextIO) -> None:
        self._plan = plan
        self._run_dir = run_dir
        self._out = out
        self._slots = [_Slot(m) for m in plan.managed]

    def run(self, stop: threading.Event, exit_with: int | None = None) -> None:
        for slot in sorted(self._slots, key=lambda s: not s.spec.redis_address):
            self._adopt_or_spawn(slot)
            if slot.spec.redis_address:
                _await_redis(slot.spec.redis_address, slot.spec.redis_password or None, stop)
        self._save_state()
        while not stop.wait(_POLL_S):
            if exit_with is not None and not _exists(exit_with):
                self._say(f"pid {exit_with} that started the stack is gone: stopping")
                break
            changed = False
            held = _held(self._run_dir)
            for slot in self._slots:
                if slot.spec.name in held:
                    changed = self._hold(slot) or changed
                else:
                    changed = self._release(slot) or changed
                    changed = self._tend(slot) or changed
            if changed:
                self._save_state()
        self._stop_all()

    # --- one process --------------------------------------------------------------------
    def _adopt_or_spawn(self, slot: _Slot) -> None:
        pid = processes.read_pid(Path(slot.spec.pid_path))
        if pid is not None and processes.is_alive(pid, slot.spec.marker):
            slot.pid, slot.started_at = pid, time.monotonic()
            self._say(f"{slot.spec.name}: adopted running pid {pid}")
            return
        self._spawn(slot, append=False)

    def _hold(self, slot: _Slot) -> bool:
        """Stops the process (SIGTERM, SIGKILL after the grace) and does not restart it."""
        now = time.monotonic()
        slot.restart_at = None
        if slot.held_since is None:
            slot.held_since = now
            self._say(f"{slot.spec.name}: held (stopped until the next up)")
            self._signal(slot, signal.SIGTERM)
            return False
        if slot.pid is None:
            return False
        code = slot.exit_code()
        if code is None:
            if now - slot.held_since > self._plan.grace_s:
                self._signal(slot, signal.SIGKILL)
            return False
        slot.last_exit, slot.pid, slot.popen = code, None, None
        Path(slot.spec.pid_path).unlink(missing_ok=True)
        self._say(f"{slot.spec.name}: stopped (held) with code {code}")
        return True

    def _release(self, slot: _Slot) -> bool:
        """A process whose hold was lifted is started again at once: a deliberate stop and
        start, not counted among the restarts of what died (``status``'s restarts)."""
        if slot.held_since is None:
            return False
        slot.held_since = None
        if slot.pid is None and slot.restart_at is None:
            self._spawn(slot, append=True, why="started again: its hold was lifted")
            return True
        return False

    def _tend(self, slot: _Slot) -> bool:
        now = time.monotonic()
        if slot.restart_at is not None:
            if now < slot.restart_at:
                return False
            slot.restart_at = None
            slot.restarts += 1
            self._spawn(slot, append=True)
            return True
        code = slot.exit_code()
        if code is None:
            return False
        ran = now - slot.started_at
        delay = slot.backoff.after_exit(ran)
        slot.last_exit, slot.pid, slot.popen = code, None, None
        slot.exits += 1
        Path(slot.spec.pid_path).unlink(missing_ok=True)
        slot.restart_at = now + delay
        self._say(
            f"{slot.spec.name}: exited with code {code} after {ran:.1f}s; "
            f"restart #{slot.restarts + 1} in {delay:.1f}s"
        )
        return True

    def _spawn(self, slot: _Slot, *, append: bool, why: str = "") -> None:
        """Starts the process; one that cannot be started (its executable missing during a
        rebuild, fork failing for memory, its log's disk full) is tried again after the
        backoff, as if it had exited at once: supervision goes on."""
        spec = slot.spec
        try:
            popen = self._popen(slot, append=append, why=why)
        except (OSError, subprocess.SubprocessError) as exc:
            delay = slot.backoff.after_exit(0.0)
            slot.restart_at = time.monotonic() + delay
            self._say(f"{spec.name}: could not start ({exc}); next try in {delay:.1f}s")
            return
        slot.pid, slot.popen, slot.started_at = popen.pid, popen, time.monotonic()
        verb = "restarted" if append else "started"
        try:
            processes.write_pid(Path(spec.pid_path), popen.pid)
        except OSError as exc:  # it runs and is supervised; only a new supervisor misses it
            self._say(f"{spec.name}: {verb} pid {popen.pid}; its pid file not written ({exc})")
            return
        self._say(f"{spec.name}: {verb} pid {popen.pid}")

    def _popen(self, slot: _Slot, *, append: bool, why: str) -> subprocess.Popen[bytes]:
        spec = slot.spec
        log_path = Path(spec.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # always O_APPEND (a first start truncates first): so logrotate's copytruncate leaves
        # the process writing at the new end, not at its old offset past a hole of NULs
        with log_path.open("ab") as log:
            if not append:
                log.truncate(0)
            else:
                why = why or f"restarted by the supervisor (#{slot.restarts})"
                log.write(f"\n--- {why} ---\n".encode())
                log.flush()
            return subprocess.Popen(
                spec.argv,
                cwd=self._plan.cwd,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=spec.umask,
            )

    # --- the whole stack ----------------------------------------------------------------
    def _stop_all(self) -> None:
        for wave in sorted({s.spec.stop_wave for s in self._slots}):
            members = [s for s in self._slots if s.spec.stop_wave == wave and s.pid is not None]
            for slot in members:
                self._signal(slot, signal.SIGTERM)
            deadline = time.monotonic() + self._plan.grace_s
            while time.monotonic() < deadline and any(s.exit_code() is None for s in members):
                time.sleep(0.05)
            for slot in members:
                if slot.exit_code() is None:
                    self._say(f"{slot.spec.name}: still running after the grace: SIGKILL")
                    self._signal(slot, signal.SIGKILL)
            for slot in members:
                for _ in range(100):
                    if slot.exit_code() is not None:
                        break
                    time.sleep(0.05)
        for slot in self._slots:
            Path(slot.spec.pid_path).unlink(missing_ok=True)
            slot.pid = None
        self._say("stopped every process")
        self._save_state()

    @staticmethod
    def _signal(slot: _Slot, signum: int) -> None:
        if slot.pid is None or slot.exit_code() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(slot.pid, signum)

    def _save_state(self) -> None:
        state = {
            s.spec.name: {
                "pid": s.pid,
                "restarts": s.restarts,
                "exits": s.exits,
                "last_exit": s.last_exit,
            }
            for s in self._slots
        }
        path = self._run_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk: up and status read older counts, nothing worse
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._say(f"could not save the state in {path} ({exc}); supervising on")

    def _say(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):  # a log on a full disk must not end supervision
            print(f"{stamp} supervisor: {message}", file=self._out, flush=True)


def read_state(run_dir: Path) -> dict[str, dict[str, int | None]]:
    """Name -> {pid, restarts, exits, last_exit}, as the supervisor last wrote it ({} if none)."""
    try:
        state: dict[str, dict[str, int | None]] = json.loads((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state


def _held(run_dir: Path) -> set[str]:
    try:
        return {entry.name for entry in os.scandir(run_dir / HELD_DIR)}
    except FileNotFoundError:
        return set()


def supervise(run_dir: Path, out: TextIO, exit_with: int | None = None) -> None:
    """The ``supervise`` command: runs until SIGTERM/SIGINT (or ``exit_with`` is gone)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Supervisor(Plan.read(run_dir), run_dir, out).run(stop, exit_with)


def _await_redis(
    address: str, password: str | None, stop: threading.Event, timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while probe_redis(address, 0.5, password) != "SERVING" and time.monotonic() < deadline:
        if stop.wait(0.05):
            return


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
