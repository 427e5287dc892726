"""What ``make demo`` tells a person to do after it. A demo that started its own stack printed
``stop: make down`` (up's last line) and closed with ``To start L2 cold: make down; make
reset-l2``, then stopped that stack itself: both ``make down`` were advice to stop a stack the
same command stops. A demo that found the stack running leaves it running: there both hold.

The recipes run here with a stand-in for the stack tool and the demo (``STACK=``, ``BIN=``):
what is tested is the recipe's shell, which case it tells each of them; the demo's and the
tool's own words are tested on their functions."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cachemesh.demo import workload
from cachemesh.demo.__main__ import NO_TOOLS_ENV, STOPS_STACK_ENV, _agent, closing_note, main
from cachemesh.demo.table import BASELINE_NOTE, LayerTable
from cachemesh.v1 import gateway_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]

# the stack tool: `running` answers as RUNNING says, every command says its arguments
_STACK = """#!/bin/sh
echo "stack $*"
case "$1" in
  running) [ "$RUNNING" = 1 ];;
  down) echo "stack stopped";;
esac
"""
# the demo (`$(BIN)/python -m cachemesh.demo`): says what the recipe told it
_PYTHON = """#!/bin/sh
echo "demo $* stops=${CACHEMESH_DEMO_STOPS_STACK-unset} model=${CACHEMESH_DEMO_MODEL-unset}\
 no_tools=${CACHEMESH_DEMO_NO_TOOLS-unset}"
"""


def _make(tmp_path: Path, target: str, running: bool) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    stack, bin_dir = tmp_path / "stack", tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stack.write_text(_STACK)
    (bin_dir / "python").write_text(_PYTHON)
    for script in (stack, bin_dir / "python"):
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env |= {"RUNNING": "1" if running else "0"}
    env.pop(STOPS_STACK_ENV, None)
    env.pop("CACHEMESH_DEMO_NO_TOOLS", None)
    done = subprocess.run(
        # -o: the prerequisites (venv, redis-server, the engine) taken as made
        ["make", "--no-print-directory", "-o", "setup", "-o", "redis-server", "-o", "engine",
         target, f"STACK={stack}", f"BIN={bin_dir}", f"RUN_DIR={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_a_demo_that_starts_its_stack_says_no_make_down(tmp_path: Path) -> None:
    lines = _make(tmp_path, "demo", running=False)
    assert lines[0] == "stack running" and lines[-1] == "stack stopped", lines
    (up,) = [line for line in lines if line.startswith("stack up")]
    assert "--no-stop-hint" in up.split(), up  # up's last line names no `stop: make down`
    assert (
        "demo -m cachemesh.demo stops=1 model=unset no_tools=unset" in lines
    )  # the note: reset-l2 alone
    assert not [line for line in lines if "make down" in line], lines


def test_a_demo_that_found_its_stack_running_says_how_to_stop_it(tmp_path: Path) -> None:
    lines = _make(tmp_path, "demo", running=True)
    (up,) = [line for line in lines if line.startswith("stack up")]
    assert "--no-stop-hint" not in up.split(), up
    assert "demo -m cachemesh.demo stops= model=unset no_tools=unset" in lines  # empty: false
    assert "stack down" not in lines
    assert lines[-1] == (
        f"the stack ran before make demo: left running (make down RUN_DIR={tmp_path / 'run'} "
        "stops it)"
    )


def test_demo_local_stops_its_stack_and_its_recipe_is_not_echoed(tmp_path: Path) -> None:
    lines = _make(tmp_path, "demo-local", running=False)
    assert lines[0].startswith("stack up --local-engine") and "--no-stop-hint" in lines[0], lines
    assert lines[1:] == [
        # local-small takes no tools (its row's takes_tools = false): the agent is sent none
        "demo -m cachemesh.demo stops=1 model=local-small no_tools=1",
        "stack down",
        "stack stopped",
    ], lines  # make printed no line of its recipe (`set -a; ...` was the first it printed)


def test_the_closing_note_says_make_down_only_when_the_stack_stays_up() -> None:
    stopped, kept = closing_note(stops_stack=True), closing_note(stops_stack=False)
    assert "make reset-l2" in stopped and "make down;" not in stopped, stopped
    assert kept.endswith("To start L2 cold: make down; make reset-l2."), kept


@pytest.mark.parametrize(
    ("setting", "value"), [(STOPS_STACK_ENV, "maybe"), (NO_TOOLS_ENV, "sometimes")]
)
def test_a_malformed_boolean_setting_is_named(
    setting: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHEMESH_KEY_A", "cm_key-a-never-shown")
    monkeypatch.setenv("CACHEMESH_KEY_B", "cm_key-b-never-shown")
    monkeypatch.setenv(setting, value)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demo: {setting} must be true or false"), err


def test_the_table_says_what_its_baseline_is_under_it() -> None:
    table = LayerTable()
    table.add(pb.CompleteResponse(served_by=pb.LAYER_MODEL, cost=pb.Cost(baseline_nanos=9)))
    lines = table.render().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("total"))
    assert lines[at + 1] == BASELINE_NOTE
    assert BASELINE_NOTE.startswith("baseline: ") and "no cache" in BASELINE_NOTE
    assert len(BASELINE_NOTE) <= len(lines[0])  # no wider than the table


@pytest.mark.parametrize(("flags", "said"), [([], True), (["--no-stop-hint"], False)])
def test_up_names_make_down_unless_its_caller_stops_the_stack(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    said: bool,
) -> None:
    from services.tools.keys import StackKeys, ensure_keys
    from services.tools.stack import cli
    from services.tools.stack.lifecycle import Stack

    def started(self: Stack, timeout_s: float = 0.0) -> StackKeys:  # no process started
        return ensure_keys(self.run_dir)

    monkeypatch.setattr(Stack, "start", started)
    (tmp_path / ".env").write_text("")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--root", str(tmp_path), "up", *flags])
    assert exit_.value.code == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("demo keys: "), last
    assert ("; stop: make down" in last) is said, last


class _Recording:
    """A client that answers each request from the model and keeps it."""

    def __init__(self) -> None:
        self.requests: list[pb.CompleteRequest] = []

    def complete(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        self.requests.append(request)
        return pb.CompleteResponse(
            served_by=pb.LAYER_MODEL, content=[pb.ContentBlock(text="Noted.")]
        )


@pytest.mark.parametrize("tools", [True, False])
def test_the_agent_is_sent_its_tools_unless_told_the_model_takes_none(
    tools: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """make demo-local's local-small takes no tools (the Gateway refuses them to it)."""
    client = _Recording()
    _agent(client, LayerTable(), "local-small", "demo-ns", tools)  # type: ignore[arg-type]
    assert client.requests
    assert all(len(r.tools) == (len(workload.TOOLS) if tools else 0) for r in client.requests)
    header = capsys.readouterr().out.splitlines()[1]
    assert ("+ 8 tools" in header) is tools and (NO_TOOLS_ENV in header) is not tools, header
