"""A stack moved off the default ports: moved whole it stays wired together; one listen setting
moved alone, with its callers still dialling the default, is refused before anything starts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from services.tools.engine.servers import LlamaServers
from services.tools.stack.cli import main
from services.tools.stack.environment import port_of
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.ports import free_ports, read_moved, write_moved

ROOT = Path(__file__).resolve().parents[2]


def _stack(tmp_path: Path, overrides: dict[str, str]) -> Stack:
    return Stack(ROOT, tmp_path / "run", overrides, environ={}, out=io.StringIO())


def test_a_moved_listener_whose_callers_still_dial_its_default_is_refused(
    tmp_path: Path,
) -> None:
    # Another stack held the defaults; following "stop it or set ROUTER_LISTEN" port by port
    # gave a stack that said SERVING while the HTTP front dialled the other stack's router.
    [port] = free_ports(1)
    stack = _stack(tmp_path, {"ROUTER_LISTEN": f"127.0.0.1:{port}"})
    with pytest.raises(StackError) as refused:
        stack.start(timeout_s=5)
    message = str(refused.value)
    assert "HTTP_FRONT_GATEWAY_ADDR names 127.0.0.1:50051" in message
    assert f"ROUTER_LISTEN=127.0.0.1:{port} moved router" in message
    assert "make up FREE_PORTS=1" in message
    assert not (tmp_path / "run" / "pids").exists()  # nothing started


def test_every_listener_moved_one_at_a_time_names_each_caller_left_behind(
    tmp_path: Path,
) -> None:
    # the review's 13 runs of "stop it or set <VAR>": every *_LISTEN and the Redis URL moved
    ports = iter(free_ports(6))
    listens = {
        var: f"127.0.0.1:{next(ports)}"
        for var in (
            "ROUTER_LISTEN",
            "SEMANTIC_CACHE_LISTEN",
            "PREFIX_CACHE_LISTEN",
            "MODEL_LISTEN",
            "MODEL_2_LISTEN",
        )
    }
    redis = f"redis://127.0.0.1:{next(ports)}/0"
    miswired = "; ".join(_stack(tmp_path, {**listens, "PREFIX_CACHE_REDIS_URL": redis}).miswired())
    for caller, moved in (
        ("SEMANTIC_CACHE_ADDR", "SEMANTIC_CACHE_LISTEN"),
        ("PREFIX_CACHE_ADDR", "PREFIX_CACHE_LISTEN"),
        ("MODEL_REPLICAS", "MODEL_LISTEN"),
        ("MODEL_REPLICAS", "MODEL_2_LISTEN"),
        ("HTTP_FRONT_GATEWAY_ADDR", "ROUTER_LISTEN"),
        ("ROUTER_ANSWERS_REDIS_URL", "PREFIX_CACHE_REDIS_URL"),  # another stack's ledger
    ):
        assert caller in miswired and moved in miswired


def test_two_processes_given_one_address_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    # MODEL_2_LISTEN set to model's own address: model-2 could not listen, yet `make up`
    # reported it SERVING (its health check reached model) while the router's second sim-large
    # replica was model again
    moved = Stack.on_free_ports(ROOT, tmp_path / "run", environ={}).overrides
    model = moved["MODEL_LISTEN"]
    stack = _stack(tmp_path, {**moved, "MODEL_2_LISTEN": model})
    with pytest.raises(StackError) as refused:
        stack.start(timeout_s=5)
    assert f"MODEL_LISTEN and MODEL_2_LISTEN are both {model}" in str(refused.value)
    assert not (tmp_path / "run" / "pids").exists()  # nothing started
    metrics = {**moved, "HTTP_FRONT_METRICS_LISTEN": f"0.0.0.0:{port_of(moved['ROUTER_LISTEN'])}"}
    assert _stack(tmp_path, metrics).shared_listens() == [
        f"ROUTER_LISTEN and HTTP_FRONT_METRICS_LISTEN are both 127.0.0.1:"
        f"{port_of(moved['ROUTER_LISTEN'])}"
    ]


def test_a_stack_moved_whole_is_wired_together(tmp_path: Path) -> None:
    assert Stack.on_free_ports(ROOT, tmp_path / "run", environ={}).miswired() == []
    assert _stack(tmp_path, {}).miswired() == []  # the defaults
    assert Stack.on_free_ports(ROOT, tmp_path / "run", environ={}).shared_listens() == []
    assert _stack(tmp_path, {}).shared_listens() == []


def test_the_free_ports_chosen_read_back_as_written(tmp_path: Path) -> None:
    moved = Stack.on_free_ports(ROOT, tmp_path / "run", environ={}).overrides
    write_moved(tmp_path / "run", moved)
    assert read_moved(tmp_path / "run") == moved
    assert (tmp_path / "run" / "ports.env").stat().st_mode & 0o077 == 0


def test_an_up_on_free_ports_that_fails_leaves_no_ports_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A failed `up --free-ports` left ports.env behind: until the next up or down, `status`
    # listed and probed 7 addresses where no stack ever ran (ports any program may hold now).
    run = tmp_path / "run"
    run.mkdir()
    (run / "demo-keys.env").write_text("export MINE=$HOME\n")  # start refuses to read it
    with pytest.raises(SystemExit) as done:
        main(["--root", str(ROOT), "--run-dir", str(run), "up", "--free-ports"])
    assert done.value.code == 1
    said = capsys.readouterr()
    assert "on free ports" in said.out and "a $ in a value" in said.err  # it failed after the move
    assert not (run / "ports.env").exists()
    assert "ports.env removed: no stack runs on those ports" in said.out


def test_an_up_on_free_ports_refused_beside_running_engines_writes_no_ports_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `up --free-ports --local-engine` beside engines of the same run dir is refused; the
    # refusal came after the move was written, outside the start's clean-up: ports.env stayed
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(LlamaServers, "recorded_pids", lambda self: [12345])
    with pytest.raises(SystemExit) as done:
        main(["--root", str(ROOT), "--run-dir", str(run), "up", "--free-ports", "--local-engine"])
    assert done.value.code == 1
    said = capsys.readouterr()
    assert "is already running" in said.err
    assert "on free ports" not in said.out
    assert not (run / "ports.env").exists()
