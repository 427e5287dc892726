"""``up``'s own settings (CACHEMESH_UP_TIMEOUT_S, CACHEMESH_LLAMA_*, CACHEMESH_CACHE_DIR) are
read as the stack's others: ``.env``, the environment over it; a malformed one stops ``up``
naming it, and never ``down``.

They were read from the process environment only, though the README lists them among the
``.env`` settings: ``CACHEMESH_UP_TIMEOUT_S=abc`` in ``.env`` was ignored (``up`` exit 0, its
default 120 s), the same in the environment refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.tools.engine import cli as engine_cli
from services.tools.engine.servers import EngineError, EngineOptions, LlamaServers, Replica
from services.tools.stack import cli
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.service_table import SERVICES

_OWN = ("CACHEMESH_UP_TIMEOUT_S", "CACHEMESH_LLAMA_REPLICAS", "CACHEMESH_LLAMA_THREADS",
        "CACHEMESH_LLAMA_CONTEXT", "CACHEMESH_CACHE_DIR")  # fmt: skip


@pytest.fixture(autouse=True)
def _no_own_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OWN:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def waited(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeouts ``Stack.start`` was given; it starts nothing (``up`` then fails, exit 1)."""
    seen: list[float] = []

    def start(self: Stack, timeout_s: float = 0.0) -> None:
        seen.append(timeout_s)
        raise StackError("not started: a unit test")

    monkeypatch.setattr(Stack, "start", start)
    return seen


def _main(root: Path, *args: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--root", str(root), "--run-dir", str(root / ".run"), *args])
    return int(exit_.value.code or 0)


def test_an_up_timeout_in_dotenv_is_taken(tmp_path: Path, waited: list[float]) -> None:
    (tmp_path / ".env").write_text("CACHEMESH_UP_TIMEOUT_S=7\n")
    assert _main(tmp_path, "up") == 1
    assert waited == [7.0]


def test_the_environment_wins_over_dotenv(
    tmp_path: Path, waited: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("CACHEMESH_UP_TIMEOUT_S=7\n")
    monkeypatch.setenv("CACHEMESH_UP_TIMEOUT_S", "9")
    assert _main(tmp_path, "up") == 1
    assert waited == [9.0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("CACHEMESH_UP_TIMEOUT_S=abc", "CACHEMESH_UP_TIMEOUT_S: expected seconds, got 'abc'"),
        ("CACHEMESH_UP_TIMEOUT_S=inf", "CACHEMESH_UP_TIMEOUT_S: must be at most"),
        ("CACHEMESH_LLAMA_REPLICAS=0", "CACHEMESH_LLAMA_REPLICAS must be a whole number >= 1"),
        ("CACHEMESH_LLAMA_THREADS=two", "CACHEMESH_LLAMA_THREADS must be a whole number >= 1"),
        ("CACHEMESH_LLAMA_CONTEXT=-1", "CACHEMESH_LLAMA_CONTEXT must be a whole number >= 1"),
    ],
)
def test_a_malformed_one_in_dotenv_stops_up_naming_it_and_not_down(
    tmp_path: Path,
    waited: list[float],
    capsys: pytest.CaptureFixture[str],
    line: str,
    message: str,
) -> None:
    (tmp_path / ".env").write_text(f"{line}\n")
    assert _main(tmp_path, "up") == 1
    assert waited == []  # refused before anything starts
    assert message in capsys.readouterr().err
    assert _main(tmp_path, "down") == 0  # down reads none of them


def test_a_malformed_one_in_the_environment_does_not_stop_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EngineOptions was read from the environment for every command: `down` exited 1
    monkeypatch.setenv("CACHEMESH_LLAMA_REPLICAS", "0")
    (tmp_path / ".env").write_text("A=1\n")
    assert _main(tmp_path, "down") == 0


def test_the_local_engines_take_their_settings_from_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[EngineOptions, Path]] = []

    def start(self: LlamaServers, ports: list[int], timeout_s: float = 60.0) -> list[Replica]:
        started.append((self.options, self._paths.root))
        raise EngineError("not started: a unit test")

    monkeypatch.setattr(LlamaServers, "start", start)
    cache = tmp_path / "engine-cache"
    (tmp_path / ".env").write_text(
        f"CACHEMESH_LLAMA_REPLICAS=1\nCACHEMESH_LLAMA_THREADS=3\n"
        f"CACHEMESH_LLAMA_CONTEXT=2048\nCACHEMESH_CACHE_DIR={cache}\n"
    )
    assert _main(tmp_path, "up", "--local-engine") == 1
    assert started == [(EngineOptions(replicas=1, threads=3, context_tokens=2048), cache)]


def test_make_engine_builds_where_up_looks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make engine` read CACHEMESH_CACHE_DIR from the environment alone: with it in .env, up
    # --local-engine would look where make engine never built
    cache = tmp_path / "engine-cache"
    (tmp_path / ".env").write_text(f"CACHEMESH_CACHE_DIR={cache}\n")
    engine_cli.main(["--root", str(tmp_path), "paths"])
    assert json.loads(capsys.readouterr().out)["server"].startswith(f"{cache}/llama-server-")
    monkeypatch.setenv("CACHEMESH_CACHE_DIR", str(tmp_path / "elsewhere"))  # the environment wins
    engine_cli.main(["--root", str(tmp_path), "paths"])
    assert json.loads(capsys.readouterr().out)["server"].startswith(f"{tmp_path}/elsewhere/")


def test_no_service_declares_them() -> None:
    # the stack's tool reads them; no service's env_keys name them (make up still hands each
    # service the whole merged .env and environment, these among them, which none reads)
    assert not {name for s in SERVICES for name in s.env_keys} & set(_OWN)
