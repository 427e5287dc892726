"""A user's script type-checks against the client as installed (``make setup``, or the
client README's ``pip install -e clients/python``): mypy --strict, run as a user runs it, from
the script's own directory, without this repository's mypy settings (its ``mypy_path`` names
the checkout; a user's project has none). An editable install whose import hook mypy cannot
follow failed with "Cannot find implementation or library stub for module named cachemesh"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

USER_SCRIPT = """\
import asyncio

from cachemesh import (
    AsyncClient,
    CachemeshError,
    Client,
    RateLimitError,
    answer_text,
    build_request,
)
from cachemesh.v1 import gateway_pb2 as pb


def main(target: str, key: str) -> None:
    with Client(target, api_key=key) as client:
        response = client.ask("How do I reset my password?")
        print(pb.Layer.Name(response.served_by), answer_text(response))
        request = build_request("Hi", model="sim-small", max_tokens=64)
        try:
            with client.stream(request) as chunks:
                for chunk in chunks:
                    print(chunk.delta.text)
        except RateLimitError as error:
            wait: float | None = error.retry_after_s
            print(wait)
        except CachemeshError as error:
            print(error.code.name, error.request_id)


async def amain(target: str, key: str) -> None:
    async with AsyncClient(target, api_key=key) as client:
        async with client.stream(build_request("x")) as chunks:
            async for chunk in chunks:
                print(chunk.delta.text)
        tokens: int = (await client.ask("x")).usage.input_tokens
        print(tokens)


asyncio.run(amain("127.0.0.1:50051", "k"))
"""


def test_a_users_script_type_checks_under_mypy_strict(tmp_path: Path) -> None:
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    environ = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            "user.py",
        ],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
