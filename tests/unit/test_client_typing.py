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

import pytest

USER_SCRIPT = """\
import asyncio

from cachemesh import (
    AsyncClient,
    CachemeshError,
    Client,
    RateLimitError,
    answer_text,
    assistant_message,
    build_request,
    user_message,
)
from cachemesh.v1 import gateway_pb2 as pb


def main(target: str, key: str) -> None:
    with Client(target, api_key=key) as client:
        response = client.ask("How do I reset my password?")
        print(pb.Layer.Name(response.served_by), answer_text(response))
        history = [user_message("Hi"), assistant_message("Hello! How can I help?")]
        request = build_request("And you?", model="sim-small", max_tokens=64, history=history)
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


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the module's runs: the second run reads the client's, protobuf's,
    grpc's and the standard library's analysis from it (as a user's second run does) and
    checks its own ``user.py`` afresh (mypy's cache is keyed by each file's contents)."""
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy_strict(tmp_path: Path, script: str, cache: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "user.py").write_text(script)
    environ = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache)]
    return subprocess.run(
        [*command, "user.py"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_users_script_type_checks_under_mypy_strict(tmp_path: Path, mypy_cache: Path) -> None:
    done = _mypy_strict(tmp_path, USER_SCRIPT, mypy_cache)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_misspelt_name_is_a_type_error(tmp_path: Path, mypy_cache: Path) -> None:
    """The package's lazy ``__getattr__`` (names load on first use) made every name of
    ``cachemesh`` type-check, as Any: ``from cachemesh import Clinet`` passed mypy --strict and
    failed at run time. A type checker now reads the package's imports alone."""
    done = _mypy_strict(tmp_path, "from cachemesh import Clinet\n\nprint(Clinet)\n", mypy_cache)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Module "cachemesh" has no attribute "Clinet"' in done.stdout, done.stdout


def test_every_public_name_loads() -> None:
    """``assistant_message`` (for ``build_request``'s ``history``) is public as
    ``user_message`` is: ``from cachemesh import assistant_message`` was an ImportError."""
    import cachemesh

    assert "assistant_message" in cachemesh.__all__
    for name in cachemesh.__all__:
        assert getattr(cachemesh, name) is not None, name
