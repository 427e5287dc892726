"""A second router given the data directory of the session's running router (a scaled compose
service on one volume, a replacement started while the old one drains) stops at start-up with
one clear line naming ROUTER_DATA_DIR, instead of overwriting the running router's billing
journal; the running router keeps its journal and goes on serving."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.tools.stack.health import SERVING, probe
from services.tools.stack.service_table import service
from tests.integration.extra_processes import loopback, service_env
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration


def test_a_router_on_a_data_directory_in_use_stops_at_start_up(stack: RunningStack) -> None:
    data_dir = stack.stack.environment(service("router"), stack.stack.keys())["ROUTER_DATA_DIR"]
    env = service_env(stack, "router", {"ROUTER_LISTEN": loopback(), "ROUTER_DATA_DIR": data_dir})
    done = subprocess.run(
        [sys.executable, "-m", "services.router"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        f"router: configuration error: ROUTER_DATA_DIR: another router is using {data_dir!r}"
        in done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr
    assert probe(stack.target) == SERVING
