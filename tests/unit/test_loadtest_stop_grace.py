"""``--duration``'s end: no request starts after it, those in flight get ``--stop-grace`` to
finish, and what the tool itself cut then is its own count, not the Gateway's error (a run
of a healthy Gateway bounded by --duration exited 1 for its own cuts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachemesh.loadtest import cli, runner
from cachemesh.loadtest.runner import LoadShape, run_plan
from cachemesh.loadtest.samples import CUT
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A, user
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from tests.unit.loadtest_cli import client_env, served, stack_config  # noqa: F401 (a fixture)

Context = grpc.aio.ServicerContext[Any, Any]
KEYS = {TENANT_A: "key"}
pytestmark = pytest.mark.usefixtures("client_env")  # the served Gateway's health asked
# an answer's time by its question: each longer than the runs' --duration (0.5 s), so that
# every request still runs at the duration's end; "hang" outlasts any grace a test gives
DELAY_S = {"fast": 0.01, "fail": 0.01, "slow": 1.5, "hang": 60.0}


class Gateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.received: list[str] = []

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        text = request.messages[-1].content[0].text
        self.received.append(text)
        await asyncio.sleep(DELAY_S[text.split()[0]])
        if text == "fail":
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            return pb.CompleteResponse()
        return pb.CompleteResponse(served_by=pb.LAYER_MODEL, content=[pb.ContentBlock(text="a")])

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:  # not asked here: the runs are unary
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unary only")
        yield pb.CompleteChunk()


@pytest.fixture
def gateway() -> Iterator[tuple[str, Gateway]]:
    """The fake Gateway (with its health) on an event loop of its own, in a thread."""
    fake = Gateway()
    with served(fake) as target:
        yield target, fake


def _items(*texts: str, session: str = "") -> list[Item]:
    return [Item("t", TENANT_A, pb.CompleteRequest(messages=[user(t)]), session=session)
            for t in texts]  # fmt: skip


def _load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, target: str, plan: list[Item], *extra: str
) -> tuple[int, dict[str, Any]]:
    """``cachemesh-load`` against ``target`` sending ``plan`` (the workload's draw replaced)."""
    monkeypatch.setattr(cli, "draw", lambda workload, count: plan[:count])
    out = tmp_path / "r.json"
    args = ["--target", target, "--out", str(out), "--requests", str(len(plan)), "--force",
            "--stack-config", str(stack_config(tmp_path)), "--duration", "0.5", *extra]  # fmt: skip
    code = cli.main(args)
    return code, json.loads(out.read_text())


def test_the_requests_in_flight_at_the_durations_end_finish_within_the_grace(
    gateway: tuple[str, Gateway], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: both requests in flight at --duration 0.5's end (each answered in 1.5 s) were
    cut, counted as errors, exit 1 from a Gateway that answered every request. Now they finish
    within the grace, and none starts after the duration's end (the plan's next two would
    have been answered within the grace too: four received, not two)."""
    target, fake = gateway
    code, doc = _load(monkeypatch, tmp_path, target, _items(*["slow"] * 6),
                      "--concurrency", "2", "--stop-grace", "30")  # fmt: skip
    results = doc["results"]
    assert code == 0, (results["errors"], doc["warnings"])
    assert fake.received == ["slow", "slow"]  # none sent after the duration's end
    assert (results["requests"], results["completed"], results["errors"]) == (2, 2, {})
    assert results["cut_at_deadline"] == 0 and results["cut_at_deadline_ms"] is None
    assert results["latency_ms"]["all"]["n"] == 2
    assert doc["run"]["stop_grace_s"] == 30.0


def test_what_the_grace_does_not_see_finish_is_cut_and_counted_apart_from_errors(
    gateway: tuple[str, Gateway], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A request still running at the grace's end is the tool's cut: its own count and figure,
    neither an error nor in the completed requests' latency; the exit code is the Gateway's
    errors' (none here: 0), and a warning says what was cut and how to let it finish."""
    target, fake = gateway
    plan = _items("hang", *["fast"] * 5_000)
    # a grace the fast answers (10 ms) finish in on a loaded machine (0.2 s cut one, 1 of 1
    # under a parallel run): the hang alone outlasts it
    code, doc = _load(monkeypatch, tmp_path, target, plan, "--concurrency", "2",
                      "--stop-grace", "3")  # fmt: skip
    results = doc["results"]
    assert code == 0, (results["errors"], doc["warnings"])
    assert results["errors"] == {} and results["cut_at_deadline"] == 1
    assert results["cut_at_deadline_ms"]["n"] == 1
    assert results["requests"] == results["completed"] + 1
    assert results["latency_ms"]["all"]["n"] == results["completed"] > 0
    # sent once (which of the first two, hang and a fast one, reaches the fake first is
    # the event loops' order: under load the fast one did, 1 of 1)
    assert fake.received.count("hang") == 1
    (said,) = [w for w in doc["warnings"] if "--stop-grace" in w]
    assert f"1 request still running 3 s after --duration's end was cut ({CUT}: " in said
    assert "not an error of the Gateway's" in said


def test_a_grace_of_0_cuts_at_the_durations_end_and_a_gateway_error_still_fails_the_run(
    gateway: tuple[str, Gateway], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target, _ = gateway
    plan = _items("fail", "slow", *["fast"] * 5_000)
    code, doc = _load(monkeypatch, tmp_path, target, plan, "--concurrency", "3",
                      "--stop-grace", "0")  # fmt: skip
    results = doc["results"]
    assert code == 1  # the Gateway's UNAVAILABLE: its error, not the cut's
    # the slow one and any fast one in flight at that instant: at most the 3 in flight
    assert results["errors"] == {"UNAVAILABLE": 1} and 1 <= results["cut_at_deadline"] <= 3
    (said,) = [w for w in doc["warnings"] if "--stop-grace" in w]
    assert "still running at --duration's end (--stop-grace 0)" in said


def test_no_turn_of_a_conversation_starts_after_the_durations_end_in_the_open_loop(
    gateway: tuple[str, Gateway],
) -> None:
    """An open loop's conversation sends each turn on the previous answer: one answered in the
    grace must not start the next (a request begun after --duration's end)."""
    target, fake = gateway
    shape = LoadShape("open", 1, 1000.0, duration_s=0.5, stream=False, grace_s=30.0)
    turns = _items("slow 1", "slow 2", "slow 3", session="c1")
    samples = asyncio.run(run_plan(target, KEYS, turns, shape, seed=1))
    assert fake.received == ["slow 1"] and [s.code for s in samples] == ["OK"]


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "3601"])
def test_a_stop_grace_out_of_bounds_is_refused_before_the_run(
    grace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(cli, "check_gateway", lambda target, tls=None: None)
    args = ["--target", "127.0.0.1:1", "--out", str(tmp_path / "r.json"), "--stop-grace", grace,
            "--stack-config", str(stack_config(tmp_path))]  # fmt: skip
    assert cli.main(args) == 2
    assert "--stop-grace must be within [0, 3600] seconds" in capsys.readouterr().err


def test_the_default_grace_is_the_one_the_help_states() -> None:
    assert cli.parser().parse_args(["--out", "x"]).stop_grace == runner.DEFAULT_STOP_GRACE_S
    assert f"default {runner.DEFAULT_STOP_GRACE_S:g}" in cli.parser().format_help()
