"""``Stack``: starts the services as local processes under the supervisor (``supervisor.py``,
which restarts any that dies), waits until SERVING, stops them.

Each process's environment is ``.env`` overlaid with the caller's environment, then this run
dir's secrets, then the explicit ``env_overrides``, then its own OTEL_SERVICE_NAME; state
lives under ``<run_dir>/data/`` unless set (``DATA_DIRS``, and the stack's own Redis). Logs go
to ``<run_dir>/logs/<service>.log`` and pids to ``<run_dir>/pids/<service>.pid``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TextIO
from urllib.parse import urlsplit

from cachemesh.envfile import EnvFileError, read_env_file
from services.tools.keys import (
    HTTP_URL_VAR,
    REDIS_PASSWORD_FILE,
    TARGET_VAR,
    StackKeys,
    announce,
    ensure_keys,
    forget_endpoints,
)
from services.tools.stack import processes
from services.tools.stack.environment import dial_address, merge_env, port_of
from services.tools.stack.health import SERVING, UNREACHABLE, probe_as, probe_http
from services.tools.stack.ports import EPHEMERAL_RANGE_FILE, ephemeral_range, free_port_overrides
from services.tools.stack.processes import Running
from services.tools.stack.redis_process import (
    REDIS,
    REDIS_CONFIG_FILE,
    REDIS_UMASK,
    REDIS_URL_VAR,
    STACK_REDIS_URL_VARS,
    probe_redis,
    redis_argv,
    stack_redis_address,
    stack_redis_refusal,
    stack_redis_urls,
    write_redis_config,
)
from services.tools.stack.service_table import SERVICES, ServiceDef, stop_order
from services.tools.stack.supervisor import (
    HELD_DIR,
    PID_NAME,
    PLAN_FILE,
    STATE_FILE,
    Managed,
    Plan,
    read_state,
)

DEFAULT_START_TIMEOUT_S = 120.0
# Where a service keeps its state unless the settings say otherwise (an empty value: in memory)
DATA_DIRS = {"SEMANTIC_CACHE_DATA_DIR": "semantic-cache", "ROUTER_DATA_DIR": "router"}
_POLL_S = 0.2
PORT_RELEASE_WAIT_S = 5.0  # how long a just-killed process may take to release its port
_REPORT_EVERY_S = 5.0


# How to put a whole stack elsewhere: one listen variable alone leaves its callers (the
# peers' *_ADDR, MODEL_REPLICAS, HTTP_FRONT_GATEWAY_ADDR, the Redis URLs) at the old address.
MOVE_THE_STACK = (
    "make up FREE_PORTS=1 (every service, its callers' settings and the stack's Redis on free "
    "ports, kept until make down; python -m services.tools.stack up --free-ports)"
)


# the secrets' files the services read (services.common.env.Env.secret, .redis_url)
INTERNAL_TOKEN_FILE_VAR = "CACHEMESH_INTERNAL_TOKEN_FILE"
REDIS_PASSWORD_FILE_VAR = "CACHEMESH_REDIS_PASSWORD_FILE"
# the credentials a process outside the mesh (the HTTP front) never holds, whoever set them
OUTSIDE_SECRETS = (
    "CACHEMESH_INTERNAL_TOKEN",
    INTERNAL_TOKEN_FILE_VAR,
    REDIS_PASSWORD_FILE_VAR,
    "CACHEMESH_ADMIN_TOKEN",
    "CACHEMESH_ADMIN_TOKEN_FILE",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_API_KEY_FILE",
    "OPENAI_API_KEY",
    "OPENAI_API_KEY_FILE",
)


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
        detach: bool = False,
    ) -> None:
        """``detach``: the supervisor outlives this process (``make up``); otherwise it stops
        the stack when this process is gone (tests, benchmarks)."""
        self.root = root.resolve()
        self.run_dir = (run_dir or self.root / ".run").resolve()
        self._overrides = dict(env_overrides or {})
        self._environ = dict(os.environ if environ is None else environ)
        self._dotenv_read: dict[str, str] | None = None  # read when first needed (not by down)
        self._out = out or sys.stdout
        self._detach = detach
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._legacy_said: set[Path] = set()  # older runners' pid files already named

    @classmethod
    def on_free_ports(
        cls,
        root: Path,
        run_dir: Path | None = None,
        env_overrides: Mapping[str, str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        out: TextIO | None = None,
        detach: bool = False,
    ) -> Stack:
        """A stack whose services listen on free loopback ports, wired to each other.

        ``env_overrides`` still win (a test may pin one address)."""
        plain = cls(root, run_dir, env_overrides, environ=environ, out=out)
        moved = free_port_overrides(plain.settings())
        overrides = {**moved, **(env_overrides or {})}
        return cls(root, run_dir, overrides, environ=environ, out=out, detach=detach)

    @property
    def overrides(self) -> dict[str, str]:
        """The explicit settings over ``.env`` and the environment (free ports, tests)."""
        return dict(self._overrides)

    def with_overrides(self, extra: Mapping[str, str]) -> Stack:
        """The same stack with ``extra`` settings over its own overrides."""
        return Stack(
            self.root,
            self.run_dir,
            {**self._overrides, **extra},
            environ=self._environ,
            out=self._out,
            detach=self._detach,
        )

    @property
    def _dotenv(self) -> dict[str, str]:
        if self._dotenv_read is None:
            self._dotenv_read = read_env_file(self.root / ".env")
        return self._dotenv_read

    # --- what the processes get -----------------------------------------------------------
    def settings(self) -> dict[str, str]:
        """The merged settings without secrets (the same for every service)."""
        return merge_env(self._dotenv, self._environ, {}, self._overrides)

    def environment(self, service: ServiceDef, keys: StackKeys) -> dict[str, str]:
        merged = merge_env(self._dotenv, self._environ, keys.env(), self._overrides)
        # the run dir's internal token is given (keys.env): a token file named in .env or the
        # shell beside it was "both set", and the service refused to start
        merged.pop(INTERNAL_TOKEN_FILE_VAR, None)
        # the stack's own Redis wants its password: in the URLs of those that use it only
        # (and then no password file as well: a URL carrying one beside it is refused)
        for variable, url in stack_redis_urls(merged, keys.redis_password).items():
            if variable in service.env_keys:
                merged[variable] = url
                merged.pop(REDIS_PASSWORD_FILE_VAR, None)
        if not service.internal:  # not even from the shell or .env
            for name in OUTSIDE_SECRETS:
                merged.pop(name, None)
        for variable, folder in DATA_DIRS.items():  # durable by default, under the run dir
            merged.setdefault(variable, str(self.run_dir / "data" / folder))
        env = service.process_env(merged)
        env["OTEL_SERVICE_NAME"] = service.otel_service_name
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def listen(self, service: ServiceDef) -> str:
        return self.settings().get(service.listen_var) or f"127.0.0.1:{service.default_port}"

    @property
    def addresses(self) -> dict[str, str]:
        """Process name -> the address a client on this host dials (Redis's when it runs)."""
        addresses = {s.name: dial_address(self.listen(s)) for s in SERVICES}
        if (redis := self.redis_address()) is not None:
            addresses[REDIS.name] = redis
        return addresses

    def metrics_listen(self, service: ServiceDef) -> str:
        return (
            self.settings().get(service.metrics_var) or f"127.0.0.1:{service.default_metrics_port}"
        )

    @property
    def metrics_addresses(self) -> dict[str, str]:
        """Service name -> where this host reads its ``GET /metrics`` (host:port)."""
        return {s.name: dial_address(self.metrics_listen(s)) for s in SERVICES if s.metrics_var}

    @property
    def router_address(self) -> str:
        return self.addresses["router"]

    def keys(self) -> StackKeys:
        return ensure_keys(self.run_dir)

    def client_endpoints(self) -> dict[str, str]:
        """Where this stack's clients reach it, as ``demo-keys.env`` exports it: the Gateway's
        host:port (CACHEMESH_TARGET) and the HTTP front's base URL (CACHEMESH_HTTP_URL)."""
        scheme = "https" if self.settings().get("HTTP_FRONT_TLS_CERT_FILE") else "http"
        return {
            TARGET_VAR: self.router_address,
            HTTP_URL_VAR: f"{scheme}://{self.addresses['http-front']}",
        }

    def log_path(self, service: ServiceDef) -> Path:
        return self.run_dir / "logs" / f"{service.name}.log"

    def _pid_path(self, service: ServiceDef) -> Path:
        return self.run_dir / "pids" / f"{service.name}.pid"

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> StackKeys:
        """Brings every process up under the supervisor and returns once all are SERVING.

        What already runs is kept (the supervisor adopts it): only the missing processes are
        started, so ``make up`` brings back one service while the others serve. If a process
        exits before it is SERVING, or the timeout passes, the whole stack is stopped.
        ``demo-keys.env`` names where this stack listens (``client_endpoints``) once every
        process is SERVING; a refusal before anything starts leaves the addresses it held, a
        start that stops the stack drops them (a failed up names no stack to dial)."""
        _refuse_miswired(self.miswired())
        _refuse_shared(self.shared_listens())
        keys = ensure_keys(self.run_dir)  # the addresses it holds kept until this stack serves
        if keys.created or not keys.has_demo_keys:
            self._say(announce(keys))  # where the keys are: never their values
        self._release_held()
        managed = self.managed()
        running = {r.service.name: r.pid for r in self.running()}
        supervisor = self.supervisor_pid()
        if supervisor is None:
            missing = [m for m in managed if m.name not in running]
            # what a dead supervisor (OOM, kill -9) left running is adopted as it is: only if
            # it was started with these settings
            adopted = [m for m in managed if m.name in running]
            _refuse_changed(
                self.changed_settings(keys, adopted),
                "processes left running by a supervisor that died were started",
            )
            for item in missing:
                self._check_port_free(item)
            kept = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
            if kept:
                self._say(f"already running, kept: {kept}")
            self._say(
                f"starting {len(missing)} of {len(managed)} processes under the supervisor "
                f"(logs in {self.run_dir / 'logs'})"
            )
            try:
                self._start_supervisor(keys, managed)
            except BaseException:
                self.stop()
                forget_endpoints(self.run_dir)
                raise
        else:
            _refuse_changed(self.changed_settings(keys, managed), "the running stack was started")
            self._say(f"the supervisor (pid {supervisor}) already runs this stack")
        try:
            self._wait_serving(managed, timeout_s)
        except BaseException:
            if supervisor is None:
                self.stop()
                forget_endpoints(self.run_dir)
            raise
        serving = ensure_keys(self.run_dir, self.client_endpoints())
        return dataclasses.replace(serving, created=keys.created)  # made by this start or not

    def miswired(self) -> list[str]:
        """Peer settings that still name a process's default address though its listen
        setting moved it (``ROUTER_LISTEN`` moved, ``HTTP_FRONT_GATEWAY_ADDR`` left at
        127.0.0.1:50051): the caller would dial whatever holds the default, another stack
        perhaps, and this stack would report SERVING yet fail every request. Each as
        ``VARIABLE=value ... (moved by VARIABLE=value)``."""
        settings = self.settings()
        found: list[str] = []
        for caller in SERVICES:
            for variable, peers in caller.peers.items():
                dialled = {
                    item.rpartition("=")[2].strip()
                    for item in settings.get(variable, "").split(",")
                }
                for peer in (s for s in SERVICES if s.name in peers):
                    default = f"127.0.0.1:{peer.default_port}"
                    if default in dialled and self.addresses[peer.name] != default:
                        found.append(
                            f"{variable} names {default}, {peer.name}'s default address, but "
                            f"{peer.listen_var}={self.listen(peer)} moved {peer.name}"
                        )
        redis = self.redis_address()
        default_redis = f"127.0.0.1:{REDIS.default_port}"
        if redis is not None and redis != default_redis:
            for variable in STACK_REDIS_URL_VARS:
                parts = urlsplit(settings.get(variable) or "")
                if parts.hostname and f"{parts.hostname}:{parts.port or 6379}" == default_redis:
                    found.append(
                        f"{variable} names {default_redis}, the stack Redis's default address, "
                        f"but {REDIS_URL_VAR} moved the stack's Redis to {redis}"
                    )
        return found

    def shared_listens(self) -> list[str]:
        """Listen settings (gRPC, metrics, the stack's Redis) that give two processes of this
        stack one address: the one that starts second cannot listen, and a health check of
        its address reaches the first. Each as ``VARIABLE and VARIABLE are both address``."""
        held: dict[str, str] = {}  # the address dialled -> the first variable naming it
        found: list[str] = []
        listens = [(s.listen_var, self.listen(s)) for s in SERVICES]
        listens += [(s.metrics_var, self.metrics_listen(s)) for s in SERVICES if s.metrics_var]
        if (redis := self.redis_address()) is not None:
            listens.append((REDIS_URL_VAR, redis))
        for variable, listen in listens:
            address = dial_address(listen)
            if address.endswith(":0"):  # any free port: never the same one twice
                continue
            if address in held:
                found.append(f"{held[address]} and {variable} are both {address}")
            else:
                held[address] = variable
        return found

    def changed_settings(self, keys: StackKeys, managed: list[ServiceDef]) -> list[str]:
        """What the running stack's processes were started with that these settings change:
        ``process: VARIABLE, ...`` (names only, never values: they may be secrets). Adopting
        the running stack would silently ignore them (a new MODEL_BACKEND served by the
        simulator)."""
        try:
            plan = {m.name: m for m in Plan.read(self.run_dir).managed}
        except (OSError, ValueError, KeyError, TypeError):
            return []  # no readable plan: nothing to compare, the processes are adopted
        changed: list[str] = []
        for service in managed:
            if service.name not in plan:
                changed.append(f"{service.name}: not part of it")
                continue
            had = plan[service.name].env
            if service is REDIS:  # started with PATH only: its address is the others' setting
                if str(self.run_dir / REDIS_CONFIG_FILE) not in plan[service.name].argv:
                    # an older version's, without a password: the URLs would be refused
                    changed.append("redis: no password (started by an older version)")
                continue
            wanted = self.environment(service, keys)
            # the variables the process reads (its table), not the rest of the shell's
            read = {*service.env_keys, *DATA_DIRS}
            names = sorted(name for name in read if wanted.get(name) != had.get(name))
            if names:
                changed.append(f"{service.name}: {', '.join(names)}")
        return changed

    def managed(self) -> list[ServiceDef]:
        """Every process of this stack: the services, and Redis when the stack runs its own."""
        return [*SERVICES, REDIS] if self.redis_address() else list(SERVICES)

    def redis_address(self) -> str | None:
        return stack_redis_address(self.settings())

    def supervisor_pid(self) -> int | None:
        """The running supervisor's pid (None: none runs). Only reads, as ``running`` does: an
        ``up`` in another shell writes a new supervisor's file at any moment."""
        path = self.run_dir / "pids" / f"{PID_NAME}.pid"
        pid, legacy = processes.recorded_pid(path, _alive_as("services.tools.stack"))
        self._say_if_legacy(path, PID_NAME, legacy)
        return pid

    def _start_supervisor(self, keys: StackKeys, managed: list[ServiceDef]) -> None:
        waves = {s.name: i for i, wave in enumerate(stop_order()) for s in wave}
        plan = Plan(
            cwd=str(self.root),
            grace_s=self._grace_s(),
            managed=[
                self._managed_process(s, keys, waves.get(s.name, len(waves))) for s in managed
            ],
        )
        plan.write(self.run_dir)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        argv = [sys.executable, "-m", "services.tools.stack", "--root", str(self.root)]
        argv += ["--run-dir", str(self.run_dir), "supervise"]
        if not self._detach:
            argv += ["--exit-with", str(os.getpid())]
        log_path = self.run_dir / "logs" / f"{PID_NAME}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=self.root,
                env={**self._environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._supervisor = popen
        processes.write_pid(self.run_dir / "pids" / f"{PID_NAME}.pid", popen.pid)

    def _managed_process(self, service: ServiceDef, keys: StackKeys, wave: int) -> Managed:
        if service is REDIS:
            address = self.redis_address()
            assert address is not None
            refusal = stack_redis_refusal(self.settings())
            if refusal is not None:
                raise StackError(refusal)
            config = write_redis_config(self.run_dir, keys.redis_password)
            try:
                argv = redis_argv(address, self.run_dir / "data" / "redis", config)
            except FileNotFoundError as exc:
                raise StackError(str(exc)) from None
            env = {"PATH": self._environ.get("PATH", "/usr/bin:/bin")}
            return Managed(
                name=service.name,
                argv=argv,
                env=env,
                log_path=str(self.log_path(service)),
                pid_path=str(self._pid_path(service)),
                marker=service.module,
                stop_wave=wave,
                redis_address=address,
                redis_password=keys.redis_password,
                umask=REDIS_UMASK,
            )
        return Managed(
            name=service.name,
            argv=[sys.executable, "-m", service.module],
            env=self.environment(service, keys),
            log_path=str(self.log_path(service)),
            pid_path=str(self._pid_path(service)),
            marker=service.module,
            stop_wave=wave,
        )

    def stop_service(self, *names: str, timeout_s: float = 60.0) -> None:
        """Stops these processes and keeps them stopped (the supervisor does not restart
        them) until the next ``start``, as ``docker compose stop``; returns once they exited."""
        known = {s.name for s in self.managed()}
        for name in names:
            if name not in known:
                raise StackError(
                    f"no process named {name!r} in this stack (it has: {', '.join(known)})"
                )
        if self.supervisor_pid() is None:
            raise StackError(f"no supervisor runs the stack in {self.run_dir}: nothing to stop")
        held = self.run_dir / HELD_DIR
        held.mkdir(parents=True, exist_ok=True)
        for name in names:
            (held / name).touch()
        deadline = time.monotonic() + timeout_s
        while alive := [r.service.name for r in self.running() if r.service.name in names]:
            if time.monotonic() > deadline:
                raise StackError(f"{', '.join(alive)} still running {timeout_s:.0f}s after held")
            time.sleep(0.05)

    def held(self) -> set[str]:
        """The processes kept stopped by ``stop_service``."""
        folder = self.run_dir / HELD_DIR
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def _release_held(self) -> None:
        for name in self.held():
            self._say(f"{name} was held stopped: starting it again")
            (self.run_dir / HELD_DIR / name).unlink(missing_ok=True)

    def stop(self, grace_s: float | None = None) -> list[str]:
        """Stops the supervisor, which stops the processes (callers first, SIGKILL after the
        grace); then whatever still runs without it. Returns the names that were running."""
        was_running = [r.service.name for r in self.running()]
        supervisor = self.supervisor_pid()
        if supervisor is not None:
            self._say(f"stopping the supervisor (pid {supervisor}) and its processes")
            os.kill(supervisor, signal.SIGTERM)
            waves = len(stop_order()) + 1
            deadline = time.monotonic() + (self._grace_s() + 5.0) * waves
            # this object's own child is reaped by ``poll`` (a zombie looks alive); a
            # supervisor another ``Stack`` started (after this one's died) is waited for too
            own = (
                self._supervisor
                if self._supervisor and self._supervisor.pid == supervisor
                else None
            )
            while processes.is_alive(supervisor, "services.tools.stack"):
                if own is not None and own.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    os.kill(supervisor, signal.SIGKILL)
                    break
                time.sleep(0.05)
        self._supervisor = None
        running = self.running()
        grace = self._grace_s() if grace_s is None else grace_s
        for wave in [*stop_order(), [REDIS]]:
            members = [r for r in running if r.service in wave]
            for item in members:
                self._say(f"stopping {item.service.name} (pid {item.pid})")
                item.signal(signal.SIGTERM)
            leftovers = _wait_exit(members, grace)
            for item in leftovers:
                self._say(f"{item.service.name} still running after {grace:.0f}s: SIGKILL")
                item.signal(signal.SIGKILL)
            _wait_exit(leftovers, 5.0)
        for service in [*SERVICES, REDIS]:
            self._pid_path(service).unlink(missing_ok=True)
        (self.run_dir / "pids" / f"{PID_NAME}.pid").unlink(missing_ok=True)
        # the stopped stack's restarts and exits: ``status`` after a ``down`` shows none
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        # the plan holds each process's environment: the internal token, the Redis password
        # and the caller's whole shell (a provider key, an OTLP header, any other tool's
        # token); it stayed on disk after ``down``
        (self.run_dir / PLAN_FILE).unlink(missing_ok=True)
        return was_running

    def running(self) -> list[Running]:
        """The live processes recorded in the pid files (a pid that now names another process
        is never signalled nor adopted). A stale file is left where it is: the supervisor owns
        the files and writes a restarted process's over its dead one's at any moment, and a
        reader that removed what it judged stale removed that new file now and then (the
        process then ran unseen: ``status`` said it was down). ``stop`` removes them all."""
        found: list[Running] = []
        for service in [*SERVICES, REDIS]:
            path = self._pid_path(service)
            pid, legacy = processes.recorded_pid(path, _alive_as(service.module))
            if pid is not None:
                found.append(Running(service=service, pid=pid))
            self._say_if_legacy(path, service.name, legacy)
        return found

    def _say_if_legacy(self, path: Path, name: str, legacy: int | None) -> None:
        """Says so when an older runner's file (no start time) names a live process that may
        be this stack's (``legacy``), which is then neither stopped nor adopted (once per
        file)."""
        if legacy is not None and path not in self._legacy_said:
            self._legacy_said.add(path)
            self._say(
                f"{path} records pid {legacy} without its start time (an older runner's file): "
                f"that pid may be another program's now, so it is neither stopped nor adopted; "
                f"if it is this stack's {name}, stop it yourself (kill {legacy})"
            )

    def status(self) -> dict[str, tuple[int | None, str]]:
        """Process name -> (pid if running, its health: ``health``)."""
        pids = {r.service.name: r.pid for r in self.running()}
        return {s.name: (pids.get(s.name), self.health(s)) for s in self.managed()}

    def health(self, service: ServiceDef, timeout_s: float = 1.0) -> str:
        """A service's health from ``GET /readyz`` on its plaintext metrics port (its overall
        gRPC health, or the HTTP front's readiness), whatever its own port speaks: a Gateway or
        HTTP front on TLS (mutual TLS too) answers no plaintext probe. Redis: AUTH and PING."""
        if service is REDIS:
            return probe_redis(self.addresses[service.name], timeout_s, self._redis_password())
        if service.metrics_var:
            return probe_http(self.metrics_addresses[service.name], timeout_s)
        return probe_as(service.protocol, self.addresses[service.name], timeout_s)

    def _redis_password(self) -> str | None:
        """The run dir's Redis password, read (never made: ``status`` changes nothing)."""
        path = self.run_dir / REDIS_PASSWORD_FILE
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

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
    def _wait_serving(self, managed: list[ServiceDef], timeout_s: float) -> None:
        start = time.monotonic()
        deadline = start + timeout_s
        next_report = start + _REPORT_EVERY_S
        pending = {s.name: s for s in managed}
        seen_exits = {name: _exits(read_state(self.run_dir), name) for name in pending}
        states: dict[str, str] = {}
        addresses = self.addresses
        while pending:
            state = read_state(self.run_dir)
            for name, service in list(pending.items()):
                if _exits(state, name) > seen_exits[name]:
                    code = state[name].get("last_exit")
                    self._fail([service], f"{name} exited with code {code} before it was SERVING")
                if self._supervisor is not None and self._supervisor.poll() is not None:
                    self._fail([], "the supervisor exited (see logs/supervisor.log)")
                remaining = max(0.05, min(1.0, deadline - time.monotonic()))
                states[name] = self.health(service, remaining)
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

    def _fail(self, culprits: list[ServiceDef], reason: str) -> NoReturn:
        parts = [reason]
        for service in culprits:
            path = self.log_path(service)
            parts.append(f"--- last lines of {path}:\n{processes.tail(path)}")
        raise StackError("\n".join(parts))

    def _check_port_free(self, service: ServiceDef) -> None:
        listen = self.redis_address() or "" if service is REDIS else self.listen(service)
        self._check_free(service, service.listen_var, listen)
        if service.metrics_var:
            self._check_free(service, service.metrics_var, self.metrics_listen(service))

    def _check_free(self, service: ServiceDef, variable: str, listen: str) -> None:
        port_of(listen)
        host = listen.rpartition(":")[0].strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # A process killed a moment ago may still hold its port: the kernel drops its memory
        # (so /proc shows no command line and it no longer counts as running) before it closes
        # its sockets. Give such a port a short while to be released before refusing.
        deadline = time.monotonic() + PORT_RELEASE_WAIT_S
        while True:
            try:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, port_of(listen)))
                return
            except OSError as exc:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StackError(
                    f"{variable}={listen}: {service.name} cannot listen there "
                    f"({exc.strerror}): {self._held_advice(port_of(listen))}"
                ) from None

    def _held_advice(self, port: int) -> str:
        """Who may hold ``port`` and what to do: in the kernel's ephemeral range any program's
        outgoing connection may (as its source port, through TIME_WAIT too), else a server."""
        span = ephemeral_range(EPHEMERAL_RANGE_FILE)
        if span is None or not span[0] <= port <= span[1]:
            return (
                f"another process listens on it (ss -tlnp 'sport = :{port}' names it): stop "
                f"it, or move the whole stack: {MOVE_THE_STACK}"
            )
        low, high = span
        ours = [p for p in self._ports() if low <= p <= high]
        return (
            f"a server holds it, or any program's outgoing connection: {port} is in this "
            f"host's ephemeral range ({low}-{high}), where the kernel picks connections' source "
            f"ports (held while open and for 60 s after, in TIME_WAIT); ss -tanp 'sport = "
            f":{port}' shows which. Stop that server, reserve this stack's ports in the range "
            f"(as root: sysctl -w net.ipv4.ip_local_reserved_ports={port_list(ours)}; it "
            f"replaces the list, so add any it holds), or move the whole stack: {MOVE_THE_STACK}"
        )

    def _ports(self) -> list[int]:
        """Every port this stack's processes listen on (services, metrics, Redis)."""
        ports = [port_of(self.listen(s)) for s in SERVICES]
        ports += [port_of(self.metrics_listen(s)) for s in SERVICES if s.metrics_var]
        if (redis := self.redis_address()) is not None:
            ports.append(port_of(redis))
        return ports

    def _grace_s(self) -> float:
        try:
            service_grace = float(self.settings().get("CACHEMESH_GRACE_S") or 10.0)
        except EnvFileError as exc:  # a stack must stop whatever became of its .env
            self._say(f"{exc}; stopping with the default grace")
            service_grace = 10.0
        except ValueError:
            service_grace = 10.0
        return max(15.0, service_grace + 5.0)

    def _say(self, message: str) -> None:
        print(message, file=self._out, flush=True)


def port_list(ports: list[int]) -> str:
    """``ports`` as ``sysctl net.ipv4.ip_local_reserved_ports`` takes them: sorted, each run
    of consecutive ports as ``first-last``, comma separated."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _refuse_miswired(miswired: list[str]) -> None:
    if miswired:
        raise StackError(
            f"this stack would dial another's addresses: {'; '.join(miswired)}. Set those "
            f"variables to the moved addresses too, or move the whole stack: {MOVE_THE_STACK}"
        )


def _refuse_shared(shared: list[str]) -> None:
    if shared:
        raise StackError(
            f"two processes of this stack would listen on one address: {'; '.join(shared)}. "
            f"Give each its own, or move the whole stack: {MOVE_THE_STACK}"
        )


def _refuse_changed(changed: list[str], what: str) -> None:
    if changed:
        raise StackError(
            f"{what} with other settings ({'; '.join(changed)}): run `make down`, then "
            "`make up` to start the stack with these"
        )


def _wait_exit(items: list[Running], timeout_s: float) -> list[Running]:
    """Waits until every item has exited or the timeout passes; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [item for item in items if item.exit_code() is None]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [item for item in alive if item.exit_code() is None]
    return alive


def _exits(state: dict[str, dict[str, int | None]], name: str) -> int:
    return int(state.get(name, {}).get("exits") or 0)


def _alive_as(marker: str) -> Callable[[int], bool]:
    """Whether a pid runs with ``marker`` in its command line (``processes.is_alive``)."""
    return lambda pid: processes.is_alive(pid, marker)
