"""Another Redis on the port was taken for ours: the tests' ``redis_server`` took any PONG as
its server up (5 of 5 runs on a port a Redis already held were handed that one, which the
test may flush), and the stack's probe said SERVING for a Redis without a password (the
stack's own always has one; redis-py's clients ignore AUTH's error there and would use it:
``reset-l2`` deleted warm prefixes in it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.prefix_cache.redis_store import WARM_PREFIX
from services.tools.keys import ensure_keys
from services.tools.stack import reset_l2
from services.tools.stack.lifecycle import StackError
from services.tools.stack.ports import free_port
from services.tools.stack.redis_process import probe_redis
from tests.redis_server import redis_server, require_password, sync_client_of


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[int]:
    """A Redis started by someone else (no password) on a loopback port, holding a key."""
    data = tmp_path / "foreign"
    data.mkdir()
    with redis_server(data) as url:  # ours, then seen from outside as "someone else's"
        client = sync_client_of(url)
        client.set(f"{WARM_PREFIX}:theirs", "kept")
        client.close()
        yield int(url.rsplit(":", 1)[1].split("/")[0])


def _kept(port: int) -> bool:
    client = sync_client_of(f"redis://127.0.0.1:{port}/0")
    try:
        return client.get(f"{WARM_PREFIX}:theirs") == b"kept"
    finally:
        client.close()


def test_the_tests_redis_server_refuses_a_port_another_redis_holds(
    foreign: int, tmp_path: Path
) -> None:
    refused = pytest.raises(RuntimeError, match=f"port {foreign} answers as another Redis")
    with refused, redis_server(tmp_path, port=foreign):
        pytest.fail("handed another Redis")  # pragma: no cover
    assert _kept(foreign)


def test_the_stack_probe_takes_no_redis_without_its_password_for_its_own(
    foreign: int, tmp_path: Path
) -> None:
    assert probe_redis(f"127.0.0.1:{foreign}", 1.0) == "SERVING"  # no password asked
    assert probe_redis(f"127.0.0.1:{foreign}", 1.0, "the-stacks-password") == "NOT_SERVING"
    (tmp_path / "ours").mkdir()
    with redis_server(tmp_path / "ours") as url:  # one with the stack's password: serving
        asyncio.run(require_password(url, "the-stacks-password"))
        address = url.removeprefix("redis://").split("/")[0]
        assert probe_redis(address, 1.0, "the-stacks-password") == "SERVING"
        assert probe_redis(address, 1.0, "another-password") == "NOT_SERVING"


def test_reset_l2_never_deletes_in_a_redis_that_took_its_port(
    foreign: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free port ``reset-l2`` picked taken by another Redis before its own bound it."""
    run_dir = tmp_path / "run"
    (run_dir / "data" / "redis").mkdir(parents=True)
    ensure_keys(run_dir)
    monkeypatch.setattr(reset_l2, "free_port", lambda: foreign)
    settings = {"PREFIX_CACHE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with pytest.raises(StackError, match="did not start"):
        reset_l2.forget_warm_prefixes(settings, run_dir, timeout_s=10)
    assert _kept(foreign)
