"""``python -m services.tools.stack keys|up|down|reset-l2|stop NAME|status|running|probe`` (and
``supervise``, which ``up`` starts).

Used by the Makefile and compose.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cachemesh._argv import Parser
from cachemesh.envfile import EnvFileError
from services.common.env import MAX_DURATION_S
from services.common.setting_names import unread_warning
from services.tools.engine.cache import EnginePaths, engine_paths
from services.tools.engine.servers import (
    EngineError,
    EngineOptions,
    LlamaServers,
    local_engine_settings,
)
from services.tools.keys import HTTP_URL_VAR, describe, ensure_keys, forget_endpoints
from services.tools.stack.health import SERVING, probe_as
from services.tools.stack.lifecycle import DEFAULT_START_TIMEOUT_S, Stack, StackError
from services.tools.stack.ports import (
    MOVED_FILE,
    forget_moved,
    free_port,
    read_moved,
    write_moved,
)
from services.tools.stack.redis_process import REDIS_URL_VAR
from services.tools.stack.service_table import unread_settings
from services.tools.stack.supervisor import read_state, supervise

_REPO_ROOT = Path(__file__).resolve().parents[3]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        sys.exit(_run(args))
    except (StackError, EnvFileError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        status = probe_as("http" if args.http else "grpc", args.address, args.timeout)
        print(status)
        return 0 if status == SERVING else 1
    root: Path = args.root
    run_dir: Path = args.run_dir or root / ".run"
    if args.command == "keys":
        print(describe(ensure_keys(run_dir)))
        return 0
    if args.command == "supervise":
        supervise(run_dir, sys.stdout, args.exit_with)
        return 0
    # where the run dir's stack runs: moved by an earlier `up --free-ports`, else the settings'
    stack = Stack(root, run_dir, read_moved(run_dir), detach=True)
    # stopping the run dir's engines needs only their pid files: no setting is read but up's
    engines = LlamaServers(engine_paths({}), run_dir, EngineOptions())
    if args.command == "up":
        # .env, the environment over it, as every setting of the stack: a bad .env or a bad
        # setting of up's own stops up here, before anything starts
        own = UpSettings.from_settings(stack.settings())
        _warn_unread(stack.settings())
        timeout_s = args.timeout if args.timeout is not None else own.timeout_s
        engines = LlamaServers(own.engine_paths, run_dir, own.engine)
        if args.local_engine:  # before a move is written: a refusal leaves no ports.env
            _refuse_a_running_stack(stack, engines)
        stack = _placed(stack, args.free_ports)
        settings = stack.settings() if args.local_engine else {}
        try:
            if args.local_engine:
                stack = _with_local_engines(stack, engines, settings)
            keys = stack.start(timeout_s)
        except BaseException:  # whatever failed, no llama-server of this up is left running
            engines.stop()
            _forget_a_move_that_runs_nothing(stack)
            raise
        print(f"stack is up: router (cachemesh.v1.Gateway) on {stack.router_address}")
        front = stack.client_endpoints()[HTTP_URL_VAR]  # https:// when the front speaks TLS
        print(f"HTTP front (Anthropic and OpenAI APIs): {front}")
        stop = (
            "make down"
            if args.run_dir is None
            else f"python -m services.tools.stack --run-dir {run_dir} down"
        )
        demo = keys.demo_keys_file if keys.has_demo_keys else "unavailable (see above)"
        # make demo stops the stack it started itself: "stop: make down" would be advice to
        # stop a stack that the same command stops
        said = "" if args.no_stop_hint else f"; stop: {stop}"
        print(f"demo keys: {demo}; logs: {run_dir / 'logs'}{said}")
        return 0
    if args.command == "down":
        if not stack.stop(args.grace):
            print(f"no stack running from {run_dir}")
        else:
            print("stack stopped")
        if engines.stop():
            print("llama-server replicas stopped")
        forget_moved(run_dir)  # the next up listens where the settings say, or on new ports
        forget_endpoints(run_dir)  # and demo-keys.env names no stack until then
        return 0
    if args.command == "reset-l2":
        # imported here: redis-py and prefix-cache's store cost every other command ~200 ms
        from services.tools.stack.reset_l2 import forget_warm_prefixes, redis_data_dir

        _refuse_a_running_stack(stack, engines)  # its Redis and its engines' KV are in use
        deleted = forget_warm_prefixes(stack.settings(), run_dir)
        if deleted is None:
            print(
                f"{REDIS_URL_VAR} is empty: prefix-cache kept its warm prefixes in its process, "
                "gone with it"
            )
        else:
            print(
                f"L2 is cold: {deleted} warm prefixes deleted from {redis_data_dir(run_dir)} "
                "(bills, commit records and totals kept)"
            )
        return 0
    if args.command == "running":
        return 0 if stack.supervisor_pid() is not None else 1
    if args.command == "stop":
        stack.stop_service(args.name)
        print(f"{args.name} stopped; the supervisor keeps it stopped until the next up")
        return 0
    supervisor = stack.supervisor_pid()
    healthy = supervisor is not None
    held = stack.held()
    print(f"{'supervisor':<15} {'':<22} pid {supervisor or '-':<8} {'' if healthy else 'STOPPED'}")
    state = read_state(run_dir)
    for name, (pid, health) in stack.status().items():
        restarts = state.get(name, {}).get("restarts") or 0
        health = f"{health} (held: stopped until the next up)" if name in held else health
        print(f"{name:<15} {stack.addresses[name]:<22} pid {pid or '-':<8} {health}", end="")
        print(f"  ({restarts} restarts)" if restarts else "")
        healthy = healthy and health == SERVING
    return 0 if healthy else 1


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    if not value <= MAX_DURATION_S:  # inf: `up` waited forever for a stack that never came up
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_DURATION_S} seconds (10 years), got {text[:32]!r}"
        )
    return value


def _grace_seconds(text: str) -> float:
    """``down --grace``: 0 (SIGKILL at once) or ``_seconds``' (a negative grace or nan was
    taken as 0 unsaid: SIGKILL at once, "still running after nans")."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass  # _seconds says it
    return _seconds(text)


@dataclass(frozen=True)
class UpSettings:
    """What ``up`` itself reads of the stack's settings (``Stack.settings()``: ``.env``, the
    environment over it), checked before anything starts. Only ``up`` reads them: a bad one
    must not stop ``down``."""

    timeout_s: float  # CACHEMESH_UP_TIMEOUT_S
    engine_paths: EnginePaths  # CACHEMESH_CACHE_DIR (up --local-engine)
    engine: EngineOptions  # CACHEMESH_LLAMA_REPLICAS, _THREADS, _CONTEXT (up --local-engine)

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> UpSettings:
        return cls(
            timeout_s=_up_timeout(settings),
            engine_paths=engine_paths(settings),
            engine=EngineOptions.from_env(settings),
        )


def _warn_unread(settings: Mapping[str, str]) -> None:
    """A line for each setting named like cachemesh's that nothing reads (a misspelled limit
    or budget was ignored without a word): on stderr, before anything starts."""
    for name, closest in unread_settings(settings):
        warning = unread_warning(name, closest, ".env or the environment")
        print(f"warning: {warning}", file=sys.stderr)


def _up_timeout(settings: Mapping[str, str]) -> float:
    """``CACHEMESH_UP_TIMEOUT_S``: seconds, else the default."""
    text = settings.get("CACHEMESH_UP_TIMEOUT_S", "").strip()
    if not text:
        return DEFAULT_START_TIMEOUT_S
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise StackError(f"CACHEMESH_UP_TIMEOUT_S: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m services.tools.stack",
        description=__doc__,
    )
    _add_global_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("keys", help="generate this install's secrets once, print the demo keys")
    up = commands.add_parser("up", help="start every service, return once all are SERVING")
    up.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        help=f"seconds to wait for SERVING (CACHEMESH_UP_TIMEOUT_S, in .env or the environment; "
        f"default {DEFAULT_START_TIMEOUT_S:g})",
    )
    up.add_argument(
        "--free-ports",
        action="store_true",
        help="the whole stack on free loopback ports, wired to each other (make up FREE_PORTS=1: "
        "another stack holds the default ports); kept in the run dir until down",
    )
    up.add_argument(
        "--local-engine",
        action="store_true",
        help="put the model processes in front of llama-server replicas (make engine builds "
        "them; CACHEMESH_LLAMA_REPLICAS, _THREADS, _CONTEXT, CACHEMESH_CACHE_DIR, in .env or "
        "the environment) serving local-small",
    )
    up.add_argument(
        "--no-stop-hint",
        action="store_true",
        help="leave 'stop: make down' out of the last line: the caller stops the stack itself "
        "(make demo, on a stack it started; make demo-local)",
    )
    down = commands.add_parser("down", help="stop the stack (SIGTERM, then SIGKILL)")
    down.add_argument(
        "--grace", type=_grace_seconds, default=None, help="seconds before SIGKILL (0: at once)"
    )
    commands.add_parser(
        "reset-l2",
        help="with the stack down: delete prefix-cache's warm prefixes (L2) from the stack's "
        "Redis under the run dir, so the next up starts with L2 cold (bills and totals kept)",
    )
    stop = commands.add_parser(
        "stop", help="stop one process and keep it stopped until the next up (compose stop)"
    )
    stop.add_argument("name", help="a process of the stack (router, model-2, redis, ...)")
    commands.add_parser("status", help="health of every service")
    commands.add_parser(
        "running",
        help="exit 0 when a supervisor runs the run dir's stack (make demo then leaves it running)",
    )
    supervisor = commands.add_parser(
        "supervise", help="(started by up) keep the stack's processes running, restart the dead"
    )
    supervisor.add_argument("--exit-with", type=int, default=None, help="stop when PID is gone")
    check = commands.add_parser(
        "probe",
        help="exit 0 if the gRPC server (--http: GET /readyz of the HTTP front, or of any "
        "service's metrics port) at ADDRESS is SERVING",
    )
    check.add_argument("address")
    check.add_argument("--http", action="store_true", help="GET /readyz instead of gRPC health")
    # a timeout of 0 or less (or nan) said UNREACHABLE of a service that serves
    check.add_argument("--timeout", type=_seconds, default=2.0, help="seconds (> 0)")
    for command in commands.choices.values():
        _add_global_arguments(command, inherited=True)  # `up --run-dir X` as `--run-dir X up`
    return parser


def _add_global_arguments(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """``--root`` and ``--run-dir``; ``inherited``: on a subcommand's parser, with no default,
    so one not given after the subcommand leaves what was given before it (or the default)."""

    def default(value: Path | None) -> Path | str | None:
        return argparse.SUPPRESS if inherited else value

    parser.add_argument(
        "--root", type=Path, default=default(_REPO_ROOT), help="repository root (.env)"
    )
    parser.add_argument("--run-dir", type=Path, default=default(None), help="default: <root>/.run")


def _placed(stack: Stack, free_ports: bool) -> Stack:
    """The stack ``up`` starts: a running one where it runs (``stack``: moved by an earlier
    ``up --free-ports``, kept in the run dir until ``down``), else on new free loopback ports
    when asked, else where the settings say."""
    moved = stack.overrides
    if moved and stack.supervisor_pid() is None and not stack.running():
        forget_moved(stack.run_dir)  # left by a stack that is gone: start afresh
        stack, moved = Stack(stack.root, stack.run_dir, detach=True), {}
    if not free_ports or moved:
        return stack
    if stack.supervisor_pid() is not None or stack.running():
        raise StackError(
            f"a stack from {stack.run_dir} already runs where the settings say: stop it first "
            "(make down), then make up FREE_PORTS=1"
        )
    stack = Stack.on_free_ports(stack.root, stack.run_dir, detach=True)
    write_moved(stack.run_dir, stack.overrides)
    print(f"on free ports (kept in {stack.run_dir / MOVED_FILE} until down)")
    return stack


def _forget_a_move_that_runs_nothing(stack: Stack) -> None:
    """After a failed ``up``: the free ports it moved the stack to (``ports.env``) are dropped
    when nothing runs there (the start stopped what it started, or started nothing), as the
    next ``up`` would drop them: until then ``status`` probed those ports, which any other
    program may hold now, and the load test's report read them as the stack's settings. A
    stack that runs (a second ``up`` of a moved stack that failed) keeps them."""
    moved = stack.run_dir / MOVED_FILE
    if not moved.is_file() or stack.supervisor_pid() is not None or stack.running():
        return
    forget_moved(stack.run_dir)
    print(f"{moved} removed: no stack runs on those ports")


def _refuse_a_running_stack(stack: Stack, engines: LlamaServers) -> None:
    """``up --local-engine`` starts its own engines: not beside a stack (or engines) that runs
    from the same run dir (checked before anything starts, so a refusal stops nothing)."""
    if stack.running() or engines.recorded_pids():
        raise StackError(
            f"a stack from {stack.run_dir} is already running; stop it first: python -m "
            f"services.tools.stack --run-dir {stack.run_dir} down (make down for the default .run)"
        )


def _with_local_engines(stack: Stack, engines: LlamaServers, settings: dict[str, str]) -> Stack:
    """Starts the llama-server replicas on free loopback ports; the stack's model processes
    then serve local-small through them. ``settings``: the stack's, read before (.env)."""
    ports = [free_port() for _ in range(engines.options.replicas)]
    replicas = engines.start(ports)
    for replica in replicas:
        print(f"  llama-server {replica.index} healthy on {replica.base_url} (pid {replica.pid})")
    return stack.with_overrides(local_engine_settings(settings, replicas, engines.options))
