"""A SIGTERM while a service starts (its imports, then the objects its ``serve`` builds before
the server's own handlers: the router's tokenizers and models, ~1.6 s) drains it: exit 0. The
default action killed it (exit 143, no drain) until ``run_service`` had its handlers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import asyncio, os, signal
from services.common.stop_signals import hold_stop_signals
if {held}:
    hold_stop_signals()  # a service's __main__, before its imports
    os.kill(os.getpid(), signal.SIGTERM)  # during them
from services.common.server import run_main

async def serve(environ, stop):
    if not {held}:
        os.kill(os.getpid(), signal.SIGTERM)  # while serve builds, before the server's handlers
    await asyncio.wait_for(stop.wait(), 20)
    print("drained", flush=True)

run_main("test", serve)
"""


@pytest.mark.parametrize("held", [True, False], ids=["during-the-imports", "during-the-build"])
def test_a_sigterm_during_the_start_up_drains_the_service(held: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(held=held)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, b"drained"), done.stderr[-400:]
