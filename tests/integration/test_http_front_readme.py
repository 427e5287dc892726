"""The ``curl`` examples of services/http_front/README.md work as printed, run by bash against
the test stack, which runs on free ports: the blocks take the front's address from the
``CACHEMESH_HTTP_URL`` of ``.run/demo-keys.env``, as a user's shell does; its Python block
runs too, in that environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration

README = ROOT / "services" / "http_front" / "README.md"
PRINTED = "http://127.0.0.1:8088"


def _curl_blocks() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if "curl " in b]


def test_the_readme_has_the_examples_this_test_runs() -> None:
    assert len(_curl_blocks()) == 3


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_work_as_printed(stack: RunningStack, tmp_path: Path) -> None:
    (tmp_path / ".run").symlink_to(stack.stack.run_dir)  # `source .run/demo-keys.env` works
    keys = "set -a; source .run/demo-keys.env; set +a\n"
    outputs = []
    for block in _curl_blocks():
        script = block.replace(PRINTED, f"http://{stack.addresses['http-front']}")
        if "source .run/demo-keys.env" not in script:
            script = keys + script  # the blocks after the first run in the same shell
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{block}\n{done.stderr}"
        outputs.append(done.stdout)
    messages, chat, listed = outputs
    assert "x-cachemesh-served-by: " in messages and '"type":"message"' in messages
    assert '"usage":{"prompt_tokens"' in chat and chat.rstrip().endswith("data: [DONE]")
    assert '"object":"list"' in listed and '"status":"ready"' in listed


def test_readme_python_example_runs_as_printed(stack: RunningStack, tmp_path: Path) -> None:
    """The SDK block used a ``key`` it never defined (NameError)."""
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    env = {**os.environ, **read_env_file(stack.stack.run_dir / "demo-keys.env")}
    script = block + "print(sorted(m.id for m in gpt.models.list()))\n"  # the front answers
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sim-large" in done.stdout
