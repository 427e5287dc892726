"""docker-compose.yml's health checks, run as compose runs them (every 5 s, in each container):
a service's says healthy only on 200 from GET /readyz, at the cost of a bare Python start (not
the whole stack CLI: 0.3 s of CPU and 59 MB each); Redis's only when the password it holds is
the server's (``redis-cli ping`` exits 0 on NOAUTH too)."""

from __future__ import annotations

import http.server
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from services.tools.stack.ports import free_port
from services.tools.stack.service_table import SERVICES
from tests.processes import stop_process
from tests.unit.compose_config import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _check(name: str, port: int) -> list[str]:
    """The service's health check in docker-compose.yml, dialling ``port`` instead."""
    test: list[str] = COMPOSE["services"][name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    inside = COMPOSE["services"][name]["environment"]
    metrics = next(v for k, v in inside.items() if k.endswith("METRICS_LISTEN"))
    theirs = f"127.0.0.1:{metrics.rsplit(':', 1)[1]}"
    assert theirs in test, test
    here = f"127.0.0.1:{port}"
    return [sys.executable if a == "python" else a.replace(theirs, here) for a in test[1:]]


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readyz() -> Iterator[tuple[int, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # its loop looks for shutdown() every poll_interval (0.5 s by default: each test's
    # teardown waited up to that long for a server with nothing in flight)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _run(check: list[str]) -> subprocess.CompletedProcess[str]:
    # a container Docker's client gave proxies: the check dials loopback, never the proxy
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "https_proxy": "http://192.0.2.1:9"}
    env["http_proxy"] = env["HTTP_PROXY"] = env["https_proxy"]
    return subprocess.run(check, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_healthy_only_on_200_from_readyz(name: str, readyz: tuple[int, type[_Readyz]]) -> None:
    port, handler = readyz
    ok = _run(_check(name, port))
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    handler.status = 503
    draining = _run(_check(name, port))
    assert (draining.returncode, draining.stdout.strip()) == (1, "NOT_SERVING")
    gone = _run(_check(name, free_port()))
    assert (gone.returncode, gone.stdout.strip()) == (1, "UNREACHABLE")


def test_the_check_imports_neither_grpc_nor_the_stack_cli(
    readyz: tuple[int, type[_Readyz]],
) -> None:
    port, _ = readyz
    check = _check("router", port)
    assert check[0] == sys.executable
    done = _run([check[0], "-X", "importtime", *check[1:]])
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    heavy = {"grpc", "opentelemetry", "services.tools.stack", "services.common.env", "yaml"}
    assert not imported & heavy


def test_redis_is_healthy_only_when_its_password_answers_pong(tmp_path: Path) -> None:
    redis = COMPOSE["services"]["redis"]
    kind, *args = redis["healthcheck"]["test"]
    script = args[0] if kind == "CMD-SHELL" else shlex.join(args)
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed: make test-deps"
    port, password = free_port(), "the-stacks-redis-password-0123"
    conf = f"port {port}\nbind 127.0.0.1\nsave ''\nappendonly no\nrequirepass {password}\n"
    server = subprocess.Popen([exe, "-"], stdin=subprocess.PIPE, cwd=tmp_path, text=True)
    assert server.stdin is not None
    server.stdin.write(conf)
    server.stdin.close()
    secret = tmp_path / "redis-password"  # where compose mounts .run/redis-password
    here = script.replace("redis-cli", f"redis-cli -p {port}").replace("$$", "$")
    here = here.replace("/run/secrets/cachemesh-redis-password", str(secret))
    try:
        wait = f"until redis-cli -p {port} ping >/dev/null 2>&1; do sleep 0.05; done"
        subprocess.run(["sh", "-c", wait], timeout=20, check=True)

        def health(auth: str | None) -> int:
            if auth is None:
                secret.unlink(missing_ok=True)
            else:
                secret.write_text(auth + "\n")
            env = {"PATH": "/usr/bin:/bin"}
            return subprocess.run(["sh", "-c", here], env=env, timeout=10).returncode

        assert health(password) == 0
        assert health(None) != 0  # NOAUTH (no file: cat fails, no password sent)
        assert health("not-the-password-0123456") != 0  # WRONGPASS
    finally:
        stop_process(server, 10)
    assert health(password) != 0  # gone
