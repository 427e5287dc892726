"""``Stack``: starts the services as local processes, waits until SERVING, stops them.

Each process's environment is ``.env`` overlaid with the caller's environment, then this run
dir's secrets, then the explicit ``env_overrides``, then its own OTEL_SERVICE_NAME. Logs go to
``<run_dir>/logs/<service>.log`` and pids to ``<run_dir>/pids/<service>.pid``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TextIO

from cachemesh.envfile import read_env_file
from services.tools.stack import processes
from services.tools.stack.environment import dial_address, merge_env, port_of
from services.tools.stack.health import SERVING, UNREACHABLE, probe_as
from services.tools.stack.keys import StackKeys, describe, ensure_keys
from services.tools.stack.ports import free_port_overrides
from services.tools.stack.processes import Running
from services.tools.stack.service_table import SERVICES, ServiceDef, stop_order

DEFAULT_START_TIMEOUT_S = 120.0
_POLL_S = 0.2
_REPORT_EVERY_S = 5.0


class StackError(RuntimeError):
    """The stack could not start (the message says why and what to do)."""


class Stack:
    def __init__(
        self,
        root: Path,
        run_dir: Path | None = None,
        env_overrides: Mapping[str, str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.root = root.resolve()
        self.run_dir = (run_dir or self.root / ".run").resolve()
        self._overrides = dict(env_overrides or {})
        self._environ = dict(os.environ if environ is None else environ)
        self._dotenv = read_env_file(self.root / ".env")
        self._out = out or sys.stdout
        self._started: list[Running] = []

    @classmethod
    def on_free_ports(
        cls,
        root: Path,
        run_dir: Path | None = None,
        env_overrides: Mapping[str, str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        out: TextIO | None = None,
    ) -> Stack:
        """A stack whose services listen on free loopback ports, wired to each other.

        ``env_overrides`` still win (a test may pin one address)."""
        plain = cls(root, run_dir, env_overrides, environ=environ, out=out)
        moved = free_port_overrides(plain.settings())
        return cls(root, run_dir, {**moved, **(env_overrides or {})}, environ=environ, out=out)

    def with_overrides(self, extra: Mapping[str, str]) -> Stack:
        """The same stack with ``extra`` settings over its own overrides."""
        return Stack(
            self.root,
            self.run_dir,
            {**self._overrides, **extra},
            environ=self._environ,
            out=self._out,
        )

    # --- what the processes get -----------------------------------------------------------
    def settings(self) -> dict[str, str]:
        """The merged settings without secrets (the same for every service)."""
        return merge_env(self._dotenv, self._environ, {}, self._overrides)

    def environment(self, service: ServiceDef, keys: StackKeys) -> dict[str, str]:
        merged = merge_env(self._dotenv, self._environ, keys.env(), self._overrides)
        env = service.process_env(merged)
        env["OTEL_SERVICE_NAME"] = service.otel_service_name
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def listen(self, service: ServiceDef) -> str:
        return self.settings().get(service.listen_var) or f"127.0.0.1:{service.default_port}"

    @property
    def addresses(self) -> dict[str, str]:
        """Service name -> the address a client on this host dials."""
        return {s.name: dial_address(self.listen(s)) for s in SERVICES}

    @property
    def router_address(self) -> str:
        return self.addresses["router"]

    def keys(self) -> StackKeys:
        return ensure_keys(self.run_dir)

    def log_path(self, service: ServiceDef) -> Path:
        return self.run_dir / "logs" / f"{service.name}.log"

    def _pid_path(self, service: ServiceDef) -> Path:
        return self.run_dir / "pids" / f"{service.name}.pid"

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> StackKeys:
        """Starts every service and returns once all are SERVING; on failure stops them all."""
        running = self.running()
        if running:
            pids = ", ".join(f"{r.service.name} pid {r.pid}" for r in running)
            raise StackError(
                f"a stack from {self.run_dir} is already running ({pids}); "
                f"stop it first: python -m services.tools.stack --run-dir {self.run_dir} down "
                "(make down for the default .run)"
            )
        keys = self.keys()
        if keys.created:
            self._say(describe(keys))
        for service in SERVICES:
            self._check_port_free(service)
        self._say(f"starting {len(SERVICES)} services (logs in {self.run_dir / 'logs'})")
        try:
            for service in SERVICES:
                item = processes.spawn(
                    service, self.environment(service, keys), self.root, self.log_path(service)
                )
                self._started.append(item)
                processes.write_pid(self._pid_path(service), item.pid)
            self._wait_serving(timeout_s)
        except BaseException:
            self.stop()
            raise
        return keys

    def stop(self, grace_s: float | None = None) -> list[str]:
        """SIGTERM (callers before the services they call), SIGKILL after the grace."""
        running = self._started or self.running()
        grace = self._grace_s() if grace_s is None else grace_s
        stopped: list[str] = []
        for wave in stop_order():
            members = [r for r in running if r.service in wave]
            for item in members:
                self._say(f"stopping {item.service.name} (pid {item.pid})")
                item.signal(signal.SIGTERM)
            leftovers = _wait_exit(members, grace)
            for item in leftovers:
                self._say(f"{item.service.name} still running after {grace:.0f}s: SIGKILL")
                item.signal(signal.SIGKILL)
            _wait_exit(leftovers, 5.0)
            stopped += [item.service.name for item in members]
        for service in SERVICES:
            self._pid_path(service).unlink(missing_ok=True)
        self._started = []
        return stopped

    def running(self) -> list[Running]:
        """The live processes recorded in the pid files; forgets stale pid files."""
        found: list[Running] = []
        for service in SERVICES:
            path = self._pid_path(service)
            pid = processes.read_pid(path)
            if pid is None:
                continue
            if processes.is_alive(pid, service.module):
                found.append(Running(service=service, pid=pid))
            else:
                path.unlink(missing_ok=True)
        return found

    def status(self) -> dict[str, tuple[int | None, str]]:
        """Service name -> (pid if running, health status at its address)."""
        pids = {r.service.name: r.pid for r in self.running()}
        return {
            s.name: (pids.get(s.name), probe_as(s.protocol, self.addresses[s.name]))
            for s in SERVICES
        }

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- helpers ----------------------------------------------------------------------------
    def _wait_serving(self, timeout_s: float) -> None:
        start = time.monotonic()
        deadline = start + timeout_s
        next_report = start + _REPORT_EVERY_S
        pending = {item.service.name: item for item in self._started}
        states: dict[str, str] = {}
        addresses = self.addresses
        while pending:
            for name, item in list(pending.items()):
                code = item.exit_code()
                if code is not None:
                    self._fail([item], f"{name} exited with code {code} before it was SERVING")
                remaining = max(0.05, min(1.0, deadline - time.monotonic()))
                states[name] = probe_as(item.service.protocol, addresses[name], remaining)
                if states[name] == SERVING:
                    elapsed = time.monotonic() - start
                    self._say(f"  {name:<15} SERVING on {addresses[name]} ({elapsed:.1f}s)")
                    del pending[name]
            now = time.monotonic()
            if pending and now >= deadline:
                waiting = ", ".join(f"{n} {states.get(n, UNREACHABLE)}" for n in pending)
                self._fail(list(pending.values()), f"not SERVING after {timeout_s:.0f}s: {waiting}")
            if pending and now >= next_report:
                waiting = ", ".join(f"{n} ({states.get(n, UNREACHABLE)})" for n in pending)
                self._say(f"  waiting for {waiting} ... {now - start:.0f}s")
                next_report += _REPORT_EVERY_S
            if pending:
                time.sleep(_POLL_S)

    def _fail(self, culprits: list[Running], reason: str) -> NoReturn:
        parts = [reason]
        for item in culprits:
            path = self.log_path(item.service)
            parts.append(f"--- last lines of {path}:\n{processes.tail(path)}")
        raise StackError("\n".join(parts))

    def _check_port_free(self, service: ServiceDef) -> None:
        listen = self.listen(service)
        port_of(listen)
        host = listen.rpartition(":")[0].strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port_of(listen)))
            except OSError as exc:
                raise StackError(
                    f"{service.listen_var}={listen}: cannot listen there ({exc.strerror}); "
                    f"another process holds the port: stop it or set {service.listen_var}"
                ) from None

    def _grace_s(self) -> float:
        try:
            service_grace = float(self.settings().get("CACHEMESH_GRACE_S") or 10.0)
        except ValueError:
            service_grace = 10.0
        return max(15.0, service_grace + 5.0)

    def _say(self, message: str) -> None:
        print(message, file=self._out, flush=True)


def _wait_exit(items: list[Running], timeout_s: float) -> list[Running]:
    """Waits until every item has exited or the timeout passes; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [item for item in items if item.exit_code() is None]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [item for item in alive if item.exit_code() is None]
    return alive
