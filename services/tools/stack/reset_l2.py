"""``python -m services.tools.stack reset-l2`` (``make reset-l2``): a cold prefix cache (L2) for
the next ``make up``.

prefix-cache keeps its warm prefixes in the stack's own Redis, whose append-only file under
``<run dir>/data/redis`` outlives ``make down``: a stack started again reads the last run's
prefixes as warm. With the stack down, this starts that redis-server alone on a free loopback
port over the same files (with its password: the run dir's ``redis-password``), deletes
prefix-cache's warm prefixes (``cachemesh:warm:*`` in its database), and stops it (every write
is fsynced before it is acknowledged). The bills, commit records and per-tenant totals stay;
the engine's KV (L3) and prefix-cache's in-process state are gone with the processes anyway.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import redis

from services.prefix_cache.redis_store import WARM_PREFIX
from services.tools.keys import ensure_keys
from services.tools.stack.lifecycle import StackError
from services.tools.stack.ports import free_port
from services.tools.stack.redis_process import (
    REDIS_UMASK,
    REDIS_URL_VAR,
    probe_redis,
    redis_argv,
    write_redis_config,
)

BATCH = 1000  # keys deleted a command


def redis_data_dir(run_dir: Path) -> Path:
    return run_dir / "data" / "redis"


def forget_warm_prefixes(
    settings: Mapping[str, str], run_dir: Path, timeout_s: float = 60.0
) -> int | None:
    """Deletes prefix-cache's warm prefixes from the stack's own Redis data under ``run_dir``
    (the stack must be down) and returns how many it deleted; None when ``settings`` keep them
    in prefix-cache's process (``PREFIX_CACHE_REDIS_URL`` empty: a restart empties them). A
    Redis the stack does not run is refused (it is not this tool's to change)."""
    url = settings.get(REDIS_URL_VAR) or ""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise StackError(
            f"{REDIS_URL_VAR} names a Redis the stack does not run: delete the "
            f"{WARM_PREFIX}:* keys of its database there yourself, or wait until they expire "
            "(5 minutes after their last use, an hour for a 1h breakpoint's)"
        )
    db = parts.path.strip("/") or "0"
    if not (db.isascii() and db.isdigit()):
        raise StackError(f"{REDIS_URL_VAR}: its database must be a number (/0), not {db!r}")
    data = redis_data_dir(run_dir)
    if not data.is_dir():
        return 0
    password = ensure_keys(run_dir).redis_password
    port = free_port()
    argv = redis_argv(f"127.0.0.1:{port}", data, write_redis_config(run_dir, password))
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, umask=REDIS_UMASK)
        try:
            deadline = time.monotonic() + timeout_s
            while probe_redis(f"127.0.0.1:{port}", 0.5, password) != "SERVING":  # loading
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    said = log.read().decode(errors="replace")[-1500:]
                    raise StackError(f"redis-server did not start over {data}: {said}")
                time.sleep(0.05)
            return _delete(port, int(db), password)
        finally:
            server.terminate()  # SIGTERM: a clean shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _delete(port: int, db: int, password: str) -> int:
    client = redis.Redis(host="127.0.0.1", port=port, db=db, password=password)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{WARM_PREFIX}:*", count=BATCH):
            batch.append(key)
            if len(batch) >= BATCH:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()
