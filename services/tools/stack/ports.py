"""Moving the stack to other addresses: free loopback ports (tests, ``up --free-ports``) or
container names (compose).

``relocate`` rewrites every setting that holds a service's address (its listen variable and
its callers' peer variables, MODEL_REPLICAS included) so the stack stays wired together.
``up --free-ports`` keeps the addresses it chose in the run dir (``ports.env``) until ``down``,
so ``status``, ``stop`` and a later ``up`` find the stack where it runs.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import os
import random
import socket
import stat
import threading
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from cachemesh.envfile import EnvFileError, parse_env_text, read_env_file
from services.tools.keys import write_secret
from services.tools.stack.environment import dial_address, port_of
from services.tools.stack.redis_process import STACK_REDIS_URL_VARS, stack_redis_address
from services.tools.stack.service_table import SERVICES

# CACHEMESH_FREE_PORT_RANGE ("20000-25999"): where free ports are chosen instead of the kernel's
# ephemeral range. A port chosen free is released until its service binds it, and meanwhile
# the kernel may hand it to another process binding port 0 (a clean clone's run, two test
# workers: another worker's gRPC server answered a stack's metrics probe, 5 tests errored);
# the tests give each test process a block of its own below the ephemeral one, held machine
# wide (``claim_port_block``, tests/conftest.py).
PORT_RANGE_VAR = "CACHEMESH_FREE_PORT_RANGE"


# Blocks of ports below the kernel's ephemeral range, one a process that claims it (each test
# process: tests/conftest.py): two test runs on one machine (CI's and a developer's, two
# helpers' ``pytest -n 2``) gave their workers gw0 the same range, and a port one run chose
# free, released until its service bound it, could be taken by the other's (a stack's start:
# "Address already in use"). A block is claimed by an exclusive lock on a file of its own,
# held by the claiming process until it ends (the kernel drops the lock with the process, a
# crash included), so no two live processes that claim blocks pick from the same ports.
BLOCK_PORTS = 1_500  # above the 1,024 recent ports never handed out again, and a stack's 13
FIRST_BLOCK_PORT = 10_000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_EPHEMERAL_LOW = 32_768  # where the host does not say: Linux's default


# The lock files' folder: one path for the whole machine, as the ports are. It followed $TMPDIR,
# and two processes with different TMPDIRs both claimed 10000-11499. World-writable and sticky
# (as /tmp is): the first user to make it is not the only one who can claim a block (root's
# 0755 folder made every other user's ``pytest_configure`` fail PermissionError: no test ran).
PORT_BLOCKS_DIR = Path("/tmp/cachemesh-port-blocks")
_PORT_BLOCKS_DIR_MODE = 0o1777


def port_blocks_dir() -> Path:
    return PORT_BLOCKS_DIR


def ephemeral_range(path: Path) -> tuple[int, int] | None:
    """The host's ephemeral ports (``ip_local_port_range``: low and high), None where the file
    is missing or unreadable (not Linux)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def ephemeral_low() -> int:
    """The first port the kernel hands out itself (to a bind to port 0, an outgoing
    connection); Linux's default where the host does not say."""
    span = ephemeral_range(EPHEMERAL_RANGE_FILE)
    return _LINUX_EPHEMERAL_LOW if span is None else span[0]


def claim_port_block(
    preferred: int = 0,
    *,
    lock_dir: Path | None = None,
    first: int = FIRST_BLOCK_PORT,
    size: int = BLOCK_PORTS,
    below: int | None = None,
) -> tuple[str, IO[bytes]]:
    """A block of ``size`` ports from ``first`` on, below ``below`` (the kernel's ephemeral
    range), that no other live process holds: its ``CACHEMESH_FREE_PORT_RANGE`` value and
    the open lock file that holds it (keep it open while the ports are in use; closing it, or
    the process ending, releases the block). Block ``preferred`` (a test worker's number)
    is tried first. A RuntimeError when every block is held."""
    end = ephemeral_low() if below is None else below
    count = (end - first) // size
    if count < 1:
        raise RuntimeError(
            f"no block of {size:,} ports between {first:,} and the kernel's ephemeral range "
            f"(from {end:,}, {EPHEMERAL_RANGE_FILE}): set {PORT_RANGE_VAR} to a free range"
        )
    directory = port_blocks_dir() if lock_dir is None else lock_dir
    _shared_folder(directory)
    refused = 0
    for index in (*range(preferred % count, count), *range(preferred % count)):
        low = first + index * size
        span = f"{low}-{low + size - 1}"
        try:
            # read-only (flock needs no write access) and made writable by all: another
            # user's lock file (0644, or 0444) still opens; O_NOFOLLOW: not a planted link
            fd = os.open(
                directory / f"{span}.lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666
            )
        except PermissionError:
            refused += 1  # a file this user may not make or open: another user's block
            continue
        handle = os.fdopen(fd, "rb")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # another process's block
            continue
        except BaseException:
            handle.close()
            raise
        return span, handle
    denied = (
        f" ({refused} of them a lock file this user may not create or open: another user's "
        f"folder, make it mode 1777)"
        if refused
        else ""
    )
    raise RuntimeError(
        f"every one of the {count} blocks of {size:,} ports from {first:,} is held by another "
        f"process (the lock files in {directory}){denied}: too many test runs at once; wait "
        f"for one to end, or set {PORT_RANGE_VAR} to a free range"
    )


def _shared_folder(directory: Path) -> None:
    """``directory`` made if missing, and world-writable and sticky where this user may change
    it (a folder another user made is left as it is: its blocks whose files this user may not
    open count as held)."""
    directory.mkdir(parents=True, exist_ok=True)
    found = directory.lstat()
    if stat.S_ISLNK(found.st_mode) or found.st_uid != os.geteuid():
        return  # not this user's to change (a link another user planted is never chmodded)
    if stat.S_IMODE(found.st_mode) != _PORT_BLOCKS_DIR_MODE:
        with contextlib.suppress(OSError):  # as where it cannot be changed: blocks count held
            os.chmod(directory, _PORT_BLOCKS_DIR_MODE)  # not mkdir's mode: the umask cuts it


# The ports this process handed out lately, never handed out again while they are here: a
# port is released as soon as it is chosen, so two calls (``loopback(), loopback()``: a model
# replica's address and its metrics') could both find it free and return it twice (a clean
# clone's CI run: the replica bound it, its metrics could not, 1 test errored). A record
# shared by the process's callers, as the kernel's own table of ports is.
_RECENT_LIMIT = 1_024
_recent: collections.deque[int] = collections.deque(maxlen=_RECENT_LIMIT)
_recent_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """``count`` different free ports: all held open until all are chosen (one at a time, the
    kernel may hand the same port out twice), from ``CACHEMESH_FREE_PORT_RANGE`` when set
    (a RuntimeError when it has too few left), none of them one of the last 1,024 this
    process handed out, nor one of ``avoid`` (free now, but another's to take)."""
    span = os.environ.get(PORT_RANGE_VAR, "")
    candidates = _candidates(span)
    with _recent_lock, contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            candidate = next(candidates, None) if span else 0
            if candidate is None:  # the range used up: never a port from outside it
                raise RuntimeError(
                    f"{PORT_RANGE_VAR}={span}: {count - len(ports)} more free port(s) wanted, "
                    f"but every other port of the range is in use or was handed out lately "
                    f"(the last {_RECENT_LIMIT:,} are not handed out again): widen the range"
                )
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((host, candidate))
            except OSError:
                continue  # in use: the next candidate
            port = int(sock.getsockname()[1])
            if port not in _recent and port not in avoid:  # else held, and the next candidate
                ports.append(port)
        _recent.extend(ports)
        return ports


def _settings_ports(settings: Mapping[str, str]) -> set[int]:
    """The ports ``settings`` (or the defaults) give the stack's services, their metrics and
    its Redis."""
    addresses = [settings.get(s.listen_var) or f"127.0.0.1:{s.default_port}" for s in SERVICES]
    addresses += [
        settings.get(s.metrics_var) or f"127.0.0.1:{s.default_metrics_port}"
        for s in SERVICES
        if s.metrics_var
    ]
    redis = stack_redis_address(settings)
    if redis is not None:
        addresses.append(redis)
    ports = set()
    for address in addresses:
        with contextlib.suppress(EnvFileError):  # a bad one is the start's to refuse
            ports.add(port_of(address))
    return ports


def _candidates(span: str) -> Iterator[int]:
    """The ports of ``span`` ("LOW-HIGH") once each, from a random one on; none (the kernel's
    choice) when ``span`` is empty."""
    if not span:
        return iter(())
    low_text, _, high_text = span.partition("-")
    if not (low_text.isdigit() and high_text.isdigit() and 0 < int(low_text) <= int(high_text)):
        raise ValueError(f"{PORT_RANGE_VAR} must be LOW-HIGH (e.g. 20000-25999), got {span!r}")
    low, high = int(low_text), min(int(high_text), 65_535)
    start = random.randint(low, high)
    return itertools.chain(range(start, high + 1), range(low, start))


def relocate(
    settings: Mapping[str, str],
    listen: Mapping[str, str],
    dial: Mapping[str, str],
    metrics: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Overrides moving each named service to a new ``listen`` address, reached at ``dial``,
    and (each named in ``metrics``) its GET /metrics to a new address.

    Peer variables that pointed at the service's old address now point at its ``dial``
    address; peers that pointed elsewhere (an external replica) are left alone.
    """
    overrides: dict[str, str] = {}
    for service in SERVICES:
        if metrics is not None and service.name in metrics:
            overrides[service.metrics_var] = metrics[service.name]
    old = {
        s.name: dial_address(settings.get(s.listen_var) or f"127.0.0.1:{s.default_port}")
        for s in SERVICES
    }
    for service in SERVICES:
        if service.name in listen:
            overrides[service.listen_var] = listen[service.name]
        for key, peers in service.peers.items():
            for peer in peers:
                if peer in dial and key in settings:
                    value = overrides.get(key, settings[key])
                    overrides[key] = _replace_address(value, old[peer], dial[peer])
    return overrides


def free_port_overrides(settings: Mapping[str, str], host: str = "127.0.0.1") -> dict[str, str]:
    """Overrides putting every service, and its metrics, on free ports of ``host`` (for tests
    and benchmarks), and the stack's own Redis (when it runs one) too."""
    # not the ports the settings give the stack (the kernel's ephemeral range holds 50051 and
    # its neighbours): a stack started there later, a default ``make up``, would find them taken
    ports = iter(free_ports(2 * len(SERVICES) + 1, host, avoid=_settings_ports(settings)))
    addresses = {s.name: f"{host}:{next(ports)}" for s in SERVICES}
    metrics = {s.name: f"{host}:{next(ports)}" for s in SERVICES}
    overrides = relocate(settings, addresses, addresses, metrics)
    old_redis = stack_redis_address(settings)
    if old_redis is not None:
        new_redis = f"{host}:{next(ports)}"
        for var in STACK_REDIS_URL_VARS:  # every URL that names the stack's own Redis moves
            url = settings.get(var) or ""
            parts = urlsplit(url)
            if url and f"{parts.hostname}:{parts.port or 6379}" == old_redis:
                user, at, _ = parts.netloc.rpartition("@")
                overrides[var] = urlunsplit(parts._replace(netloc=f"{user}{at}{new_redis}"))
    return overrides


def _replace_address(value: str, old: str, new: str) -> str:
    items = []
    for item in value.split(","):
        label, sep, address = item.strip().rpartition("=")
        if address == old:
            address = new
        items.append(f"{label}{sep}{address}")
    return ",".join(items)


MOVED_FILE = "ports.env"  # in the run dir: the addresses ``up --free-ports`` chose, until down


def read_moved(run_dir: Path) -> dict[str, str]:
    """The settings ``up --free-ports`` moved the run dir's stack with (empty: not moved)."""
    path = run_dir / MOVED_FILE
    return read_env_file(path) if path.is_file() else {}


def write_moved(run_dir: Path, overrides: Mapping[str, str]) -> None:
    """Keeps ``overrides`` for the commands after ``up`` (mode 0600: a Redis URL may hold a
    password); refused unless the reader reads back exactly what is written."""
    text = "".join(f"{name}={value}\n" for name, value in sorted(overrides.items()))
    path = run_dir / MOVED_FILE
    if parse_env_text(text, str(path)) != dict(overrides):
        raise EnvFileError(f"{path}: a moved setting would not read back as written")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_secret(path, text)


def forget_moved(run_dir: Path) -> None:
    (run_dir / MOVED_FILE).unlink(missing_ok=True)
