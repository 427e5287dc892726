"""The runner against a small in-process Gateway: loops, bounds, streaming, errors, processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient
from cachemesh.loadtest import runner
from cachemesh.loadtest.load import NotLoopback, check_target, run_load
from cachemesh.loadtest.runner import Interrupted, LoadShape, run_plan, shares
from cachemesh.loadtest.samples import CUT, INTERRUPTED, LOST, Sample
from cachemesh.loadtest.stats import summarise
from cachemesh.loadtest.workloads import Item, WorkloadSpec, build
from cachemesh.loadtest.workloads.base import TENANT_A, user
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from tests.public_data import data_dir
from tests.unit.loadtest_cli import served

Context = grpc.aio.ServicerContext[Any, Any]


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Answers from L1 unless the question says ``fail`` (UNAVAILABLE) or ``slow`` (0.3 s). A
    request whose ``request_id`` is ``<conversation>/<turn>`` takes 0.05 s and is recorded: the
    turns each conversation was sent in, and those sent while an earlier one was in flight."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = 0
        self.turns: dict[str, list[int]] = defaultdict(list)
        self.talking: set[str] = set()  # conversations with a turn in flight
        self.early: list[str] = []  # turns sent before their conversation's previous answer
        self.delay_s = 0.01  # of an answer, unless slow (or a conversation's turn: 0.05 s)
        self.by_peer: Counter[str] = Counter()  # requests by client connection (one a process)

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        text = request.messages[-1].content[0].text
        self.by_peer[context.peer()] += 1
        conversation, _, turn = request.request_id.rpartition("/")
        if conversation:
            if conversation in self.talking:
                self.early.append(request.request_id)
            self.talking.add(conversation)
            self.turns[conversation].append(int(turn))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.3 if text == "slow" else 0.05 if conversation else self.delay_s)
        finally:
            self.in_flight -= 1
            self.talking.discard(conversation)
        if text == "fail":
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("down")
            return pb.CompleteResponse()
        return pb.CompleteResponse(
            served_by=pb.LAYER_SEMANTIC_CACHE,
            content=[pb.ContentBlock(text="answer")],
            cost=pb.Cost(cost_nanos=0, baseline_nanos=100, saved_nanos=100),
        )

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:
        yield pb.CompleteChunk(start=pb.CompleteResponse(served_by=pb.LAYER_MODEL))
        await asyncio.sleep(0.05)
        yield pb.CompleteChunk(delta=pb.ContentBlock(text="hi"))
        await asyncio.sleep(0.05)
        end = pb.CompleteResponse(cost=pb.Cost(cost_nanos=7))
        if request.messages[-1].content[0].text == "reconciled":
            # an engine that reports its KV reuse only at the end: the start's layer was a guess
            end.served_by = pb.LAYER_PREFIX_CACHE
        yield pb.CompleteChunk(end=end)


@pytest.fixture
def gateway() -> Iterator[tuple[str, FakeGateway]]:
    """The fake Gateway on its own event loop in a thread (the runner owns this thread's)."""
    fake = FakeGateway()
    with served(fake) as target:
        yield target, fake


def _items(*texts: str) -> list[Item]:
    return [Item("t", TENANT_A, pb.CompleteRequest(messages=[user(t)])) for t in texts]


KEYS = {TENANT_A: "key"}


def _conversations(name: str, count: int, mix: str = "agent=1,faq=1") -> list[Item]:
    """``count`` items of a workload, each agent turn's ``request_id`` naming its conversation
    and turn: the agent workload gives a conversation's turns one after the other, each
    extending the previous one's messages."""
    workload = build(WorkloadSpec(name, 3, "ns", data_dir(), mix=mix))
    items = [workload.next_item() for _ in range(count)]
    conversation, turn, previous = 0, -1, 0
    for item in items:
        if item.kind != "agent":
            continue
        size = len(item.request.messages)
        conversation, turn = (conversation, turn + 1) if size > previous else (conversation + 1, 0)
        previous = size
        item.request.request_id = f"c{conversation}/{turn}"
    return items


def _in_order(fake: FakeGateway, items: Sequence[Item]) -> None:
    """Every conversation's turns were sent in order, each after the previous one's answer."""
    assert not fake.early, fake.early
    assert fake.turns and all(t == list(range(len(t))) for t in fake.turns.values()), fake.turns
    assert sum(map(len, fake.turns.values())) == sum(i.kind == "agent" for i in items)


def test_closed_loop_sends_each_conversations_turn_after_the_previous_answer(
    gateway: tuple[str, FakeGateway],
) -> None:
    """16 in flight sent one conversation's turns together (turn k+1 before turn k's answer,
    which no agent does: 34.9% saved against 77.8% at 1 in flight on the same 48 requests). A
    worker owns a conversation until its last turn; 16 in flight are 16 conversations."""
    target, fake = gateway
    items = _conversations("agent", 240)  # 24 conversations
    shape = LoadShape("closed", 16, 0.0, duration_s=60, stream=False)
    samples = asyncio.run(run_plan(target, KEYS, items, shape))
    assert sorted(s.index for s in samples if s.ok) == list(range(240))
    _in_order(fake, items)
    # never more than 16, and conversations side by side (exactly 16 at once is the machine's
    # timing: a loaded run read 15, its first sends spread past a turn's 0.05 s)
    assert 1 < fake.most_in_flight <= 16


def test_open_loop_starts_a_conversation_at_its_arrival_and_each_turn_on_the_answer(
    gateway: tuple[str, FakeGateway],
) -> None:
    target, fake = gateway
    items = _conversations("agent", 160)
    shape = LoadShape("open", 1, rate_rps=100.0, duration_s=60, stream=False, seed=1)
    samples = asyncio.run(run_plan(target, KEYS, items, shape, seed=1))
    assert sorted(s.index for s in samples if s.ok) == list(range(160))
    _in_order(fake, items)
    assert fake.most_in_flight >= 4  # the conversations' arrivals did not wait for answers


def test_a_mix_keeps_its_agent_turns_in_order_and_sends_every_other_item(
    gateway: tuple[str, FakeGateway],
) -> None:
    target, fake = gateway
    items = _conversations("mix", 120)
    shape = LoadShape("closed", 16, 0.0, duration_s=60, stream=False)
    samples = asyncio.run(run_plan(target, KEYS, items, shape))
    assert sorted(s.index for s in samples if s.ok) == list(range(120))
    _in_order(fake, items)


def test_several_processes_keep_a_conversation_in_one_process(
    gateway: tuple[str, FakeGateway],
) -> None:
    target, fake = gateway
    items = _conversations("agent", 60)
    shape = LoadShape("closed", 4, 0.0, duration_s=60, stream=False)
    samples = run_load(target, KEYS, [], items, shape, processes=2)
    assert sorted(s.index for s in samples if s.ok) == list(range(60))
    _in_order(fake, items)


def test_closed_loop_keeps_n_in_flight_and_counts_errors(gateway: tuple[str, FakeGateway]) -> None:
    target, fake = gateway
    shape = LoadShape("closed", 4, 0.0, duration_s=30, stream=False)
    samples = asyncio.run(run_plan(target, KEYS, _items(*["q"] * 30, "fail", "fail"), shape))
    assert len(samples) == 32, [s.code for s in samples]
    assert sum(s.code == "UNAVAILABLE" for s in samples) == 2
    assert fake.most_in_flight == 4
    assert {s.layer for s in samples if s.ok} == {"semantic_cache"}


def test_every_run_stops_at_its_deadline_and_counts_what_it_cut(
    gateway: tuple[str, FakeGateway],
) -> None:
    """A request still running at the deadline is an error of its own, its latency the time
    it ran: a slow tail is never dropped from the figures."""
    target, _ = gateway
    shape = LoadShape("closed", 2, 0.0, duration_s=0.5, stream=False)
    before = time.monotonic()
    samples = asyncio.run(run_plan(target, KEYS, _items(*["slow"] * 100), shape))
    after = time.monotonic()
    assert len(samples) < 100  # stopped at its deadline (0.3 s a request), not its plan's end
    cut = [s for s in samples if s.code == CUT]
    assert len(cut) == 2 and all(s.ok or s.code == CUT for s in samples)  # the two in flight
    # by order, not by how long anything took: each cut request's time runs from its start to
    # the deadline (at least duration_s after the run began; before the run returned), and
    # every request was sent before that cut
    ends = [s.started_s + s.latency_s for s in cut]
    assert all(before + shape.duration_s <= end <= after for end in ends), (before, ends)
    assert max(s.started_s for s in samples) <= min(ends)
    assert sorted(s.index for s in samples) == list(range(len(samples)))


def test_a_client_fault_outside_grpc_is_counted_not_lost(
    gateway: tuple[str, FakeGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the client's outside its error tree (grpc's ExecuteBatchError was one, for a
    key it refused to send) killed the worker and its requests vanished from the report."""
    target, _ = gateway

    async def fault(self: AsyncClient, request: pb.CompleteRequest) -> pb.CompleteResponse:
        raise RuntimeError("a fault of the client's own")

    monkeypatch.setattr(AsyncClient, "complete", fault)
    shape = LoadShape("closed", 2, 0.0, duration_s=30, stream=False)
    samples = asyncio.run(run_plan(target, KEYS, _items("a", "b", "c"), shape))
    assert len(samples) == 3 and {s.code for s in samples} == {"RuntimeError"}


def test_open_loop_sends_at_the_rate_not_the_answers_pace(gateway: tuple[str, FakeGateway]) -> None:
    target, fake = gateway
    shape = LoadShape("open", 1, rate_rps=40.0, duration_s=1.5, stream=False, seed=1)
    samples = asyncio.run(run_plan(target, KEYS, _items(*["slow"] * 500), shape, seed=1))
    # ~40/s for 1.5 s, each taking 0.3 s: many in flight at once, those at the deadline cut.
    # By the schedule, not by how many answers came back in real time: every request due
    # before the deadline on the seeded schedule was sent (one due in the instant between the
    # run's start and the loop's may fall past it), late or not, none waiting for an answer
    rng, due, scheduled = random.Random(1), 0.0, 0
    while (due := due + rng.expovariate(shape.rate_rps)) < shape.duration_s:
        scheduled += 1
    assert scheduled - 1 <= len(samples) <= scheduled, (len(samples), scheduled)
    assert all(s.ok or s.code == CUT for s in samples)
    assert fake.most_in_flight >= 5


def test_streaming_records_the_time_to_the_first_token(gateway: tuple[str, FakeGateway]) -> None:
    target, _ = gateway
    shape = LoadShape("closed", 2, 0.0, duration_s=30, stream=True)
    samples = asyncio.run(run_plan(target, KEYS, _items("a", "b"), shape))
    for sample in samples:
        assert sample.layer == "model" and sample.cost_nanos == 7
        assert sample.ttft_s is not None and 0.04 < sample.ttft_s < sample.latency_s


def test_a_stream_is_counted_under_its_ends_layer(gateway: tuple[str, FakeGateway]) -> None:
    """The start chunk's layer is provisional (an engine's KV reuse, a provider's cache read,
    arrive with the end); the end's is the one the bill and the per-layer report use. An end
    without one (an older Gateway) keeps the start's."""
    target, _ = gateway
    shape = LoadShape("closed", 2, 0.0, duration_s=30, stream=True)
    items = [
        Item(t, TENANT_A, pb.CompleteRequest(messages=[user(t)])) for t in ("reconciled", "plain")
    ]
    samples = asyncio.run(run_plan(target, KEYS, items, shape))
    layers = {sample.kind: sample.layer for sample in samples}
    assert layers == {"reconciled": "prefix_cache", "plain": "model"}


def test_several_processes_share_the_plan_and_warm_up_is_marked(
    gateway: tuple[str, FakeGateway],
) -> None:
    target, fake = gateway
    shape = LoadShape("closed", 3, 0.0, duration_s=60, stream=False)
    samples = run_load(target, KEYS, _items("w", "w"), _items(*["slow"] * 12), shape, processes=2)
    assert sum(s.warmup for s in samples) == 2
    assert sorted(s.index for s in samples if not s.warmup and s.ok) == list(range(12))
    assert fake.most_in_flight == 3  # 2 + 1, not 2 a process


def test_each_process_sends_a_share_of_the_plan_in_proportion_to_its_slots(
    gateway: tuple[str, FakeGateway],
) -> None:
    """3 in flight over 2 processes is 2 + 1 slots, but the plan was split in halves: the
    1-slot process sent its half alone once the other had finished (a fake Gateway at 100 ms:
    18.3 req/s reported where one process measured 28.9)."""
    target, fake = gateway
    shape = LoadShape("closed", 3, 0.0, duration_s=60, stream=False)
    samples = run_load(target, KEYS, [], _items(*["q"] * 12), shape, processes=2)
    assert sorted(s.index for s in samples if s.ok) == list(range(12))
    assert sorted(fake.by_peer.values()) == [4, 8]  # a process per connection: 1 slot, 2 slots
    singles = [[i] for i in range(7)]
    closed, opened = LoadShape("closed", 5, 0.0, 60, False), LoadShape("open", 5, 10.0, 60, False)
    assert shares(singles, closed, 2) == [[0, 2, 4, 5], [1, 3, 6]]
    assert shares(singles[:5], opened, 2) == [[0, 2, 4], [1, 3]]
    # a conversation's turns stay in one process
    assert shares([[0, 2], [1], [3, 4]], closed, 2) == [[0, 2, 3, 4], [1]]


def test_a_client_process_that_dies_is_counted_not_waited_for(
    gateway: tuple[str, FakeGateway],
) -> None:
    """A client process killed mid-run (kill -9, the OOM killer) hung the run until duration +
    timeout + 60 s, then lost every sample (RuntimeError, no report). The others' samples are
    kept and the dead one's share of the plan counted as CLIENT_PROCESS_LOST, with a warning."""
    target, fake = gateway
    killed: list[int] = []

    def kill_one() -> None:
        while sum(fake.by_peer.values()) < 2:  # both sending, or one far along
            time.sleep(0.01)
        child = mp.active_children()[0]
        killed.append(child.pid or 0)
        child.kill()

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    said: list[str] = []
    shape = LoadShape("closed", 2, 0.0, duration_s=10, stream=False, timeout_s=1)
    plan = _items(*["slow"] * 20)
    samples = run_load(target, KEYS, [], plan, shape, processes=2, warn=said.append)
    killer.join(5)
    lost = sorted(s.index for s in samples if s.code == LOST)
    assert lost in shares([[i] for i in range(20)], shape, 2), lost  # the dead one's share
    assert sorted(s.index for s in samples if s.ok) == sorted(set(range(20)) - set(lost))
    (warning,) = said
    assert f"(pid {killed[0]}) was killed by signal 9 (SIGKILL" in warning
    assert f"its 10 planned requests are counted as errors {LOST}" in warning
    timed = summarise([s for s in samples if s.code != LOST], {})["wall_s"]
    assert summarise(samples, {})["wall_s"] == timed  # the lost samples have no time


_MARKS = "CACHEMESH_TEST_RUNNER_MARKS"  # a folder: a client process and the test meet there


async def _answers_at_once_or_waits(
    target: str, keys: dict[str, str], plan: Sequence[Item], shape: LoadShape, *,
    warmup: bool = False, seed: int = 0, tick: Callable[[], None] = lambda: None,
    places: Sequence[int] | None = None,
) -> list[Sample]:  # fmt: skip
    """run_plan in a client process: the first (seed 7) answers its share at once, the other
    sends until its parent stops it (both answer at once if the seed is 0)."""
    if seed == 7 or not shape.seed:
        return [
            Sample("t", "model", "OK", time.monotonic(), 0.01, None, index=i) for i in places or ()
        ]
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise Interrupted([]) from None
    return []


def _first_finishes_then_waits(*args: Any) -> None:
    """A client process (``runner._child``) whose run is over before the Ctrl-C: the first
    one, once its event loop is closed, says so and reports only after its parent has had
    the Ctrl-C and stopped its processes."""
    marks = Path(os.environ[_MARKS])
    run = asyncio.run

    def run_then_wait(main: Any) -> Any:
        try:
            return run(main)
        finally:
            if args[-1] == 0:
                (marks / "finished").touch()
                while not (marks / "stopped").exists():
                    time.sleep(0.01)

    runner.run_plan = _answers_at_once_or_waits
    asyncio.run = run_then_wait  # type: ignore[assignment]  # this process only
    _CHILD(*args)


def _first_dies_mid_report(*args: Any) -> None:
    """A client process whose run is over (both answer at once); the first one is killed
    halfway through writing its report."""

    def half_then_killed(self: Any, buf: bytes, write: Any = os.write) -> None:
        write(self.fileno(), bytes(buf[: len(buf) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)

    if args[-1] == 0:
        Connection._send = half_then_killed  # type: ignore[attr-defined]  # this process only
    runner.run_plan = _answers_at_once_or_waits
    _CHILD(*args)


_CHILD = runner._child


def test_ctrl_c_after_a_process_finished_keeps_its_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C just after a client process had finished its run: it was sent SIGTERM too, with
    its event loop closed (SIGTERM's default action again): killed before or while it sent
    its samples, its answered share was counted CLIENT_PROCESS_LOST, or, killed mid-message,
    cachemesh-load hung for good (3 runs of 3)."""
    monkeypatch.setenv(_MARKS, str(tmp_path))
    monkeypatch.setattr(runner, "_child", _first_finishes_then_waits)
    said: list[str] = []
    ctrl_c: list[int] = []

    def progress(done: int) -> None:
        if ctrl_c:  # the loop went round once since: its processes were stopped
            (tmp_path / "stopped").touch()
        elif (tmp_path / "finished").exists():
            ctrl_c.append(done)
            signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, now

    shape = LoadShape("closed", 2, 0.0, duration_s=60, stream=False)
    with pytest.raises(Interrupted) as stop:
        runner.run_processes(
            "127.0.0.1:1", KEYS, _items(*["q"] * 8), shape, 2, progress, said.append
        )
    assert said == []
    assert (
        sorted(s.index for s in stop.value.samples) == shares([[i] for i in range(8)], shape, 2)[0]
    )
    assert all(s.ok for s in stop.value.samples)


def test_a_process_killed_mid_report_is_counted_not_waited_for_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client process killed while it wrote its report left half a message: the run read
    the rest of it for good (and every other process waited for its lock)."""
    monkeypatch.setattr(runner, "_child", _first_dies_mid_report)
    shape = LoadShape("closed", 2, 0.0, duration_s=60, stream=False, seed=0)  # both answer
    said: list[str] = []
    got: list[list[Sample]] = []

    def run() -> None:
        got.append(runner.run_processes(
            "127.0.0.1:1", KEYS, _items(*["q"] * 8), shape, 2, lambda _: None, said.append
        ))  # fmt: skip

    load = threading.Thread(target=run, daemon=True)
    load.start()
    load.join(60)
    assert not load.is_alive(), "the run still waits for the killed process's report"
    (samples,) = got
    first, second = shares([[i] for i in range(8)], shape, 2)
    assert sorted(s.index for s in samples if s.ok) == second
    assert sorted(s.index for s in samples if s.code == LOST) == first
    (warning,) = said
    assert "was killed by signal 9 (SIGKILL" in warning


@pytest.mark.parametrize(("mode", "processes"), [("closed", 1), ("closed", 2), ("open", 1)])
def test_ctrl_c_writes_the_report_and_the_log_of_the_run_until_then(
    gateway: tuple[str, FakeGateway], tmp_path: Path, mode: str, processes: int
) -> None:
    """Ctrl-C lost the whole run: a KeyboardInterrupt traceback, exit -2, no report and no
    request log, though every request sent until then was answered and billed."""
    target, fake = gateway
    fake.delay_s = 0.2
    out, log_out = tmp_path / "r.json", tmp_path / "r.jsonl"
    (tmp_path / "empty.env").touch()  # --stack-config: no setting
    env = {**os.environ, "CACHEMESH_API_KEY": "k", "CACHEMESH_KEY_B": "k2"}
    for name in ("CACHEMESH_ADMIN_TOKEN_FILE", "CACHEMESH_ADMIN_TOKEN"):
        env.pop(name, None)
    load = subprocess.Popen(
        [sys.executable, "-m", "cachemesh.loadtest", "--target", target, "--mode", mode,
         "--rate", "50", "--concurrency", "2", "--processes", str(processes),
         "--requests", "5000", "--out", str(out), "--log-out", str(log_out),
         "--stack-config", str(tmp_path / "empty.env")],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        while sum(fake.by_peer.values()) < 10 or fake.in_flight < 2:  # every process sends
            assert load.poll() is None, load.communicate()
            time.sleep(0.01)
        os.killpg(load.pid, signal.SIGINT)  # Ctrl-C at a terminal: every process of the group
        _, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode == 130, err
    assert "Traceback" not in err
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert doc["warnings"][0].startswith("run interrupted (Ctrl-C) after ")
    assert list(results["errors"]) == [INTERRUPTED]  # the requests in flight: cut, not lost
    cut = results["errors"][INTERRUPTED]
    assert cut == 2 if mode == "closed" else cut >= 1
    assert 10 <= results["requests"] == results["completed"] + cut < 5000
    assert len(log_out.read_text().splitlines()) == results["requests"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["empty.env", "r.json", "r.jsonl"]  # no temp file (empty.env: the config)


def test_a_wall_clock_step_mid_run_changes_no_duration(
    gateway: tuple[str, FakeGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock stepping an hour forward mid-run (NTP makestep, a VM resumed) made a
    short run's wall_s an hour, its req/s near zero and the request log an hour long."""
    from cachemesh.loadtest.cli import sent_log
    from cachemesh.loadtest.stats import summarise

    target, _ = gateway
    real, calls = time.time, itertools.count()
    monkeypatch.setattr(time, "time", lambda: real() + (3600.0 if next(calls) >= 5 else 0.0))
    items = _items(*["q"] * 10)
    shape = LoadShape("closed", 1, 0.0, duration_s=30, stream=False)
    samples = asyncio.run(run_plan(target, KEYS, items, shape))
    assert len(samples) == 10 and next(calls) >= 5  # the clock stepped within the run
    assert summarise(samples, {})["wall_s"] < 30  # the run's deadline bounds it
    log = sent_log(samples, [], items)
    assert log[-1].t_ms - log[0].t_ms < 30_000


def test_several_processes_time_their_requests_on_one_monotonic_clock(
    gateway: tuple[str, FakeGateway],
) -> None:
    """Samples of spawned processes are merged (wall_s, the log's order and offsets): their
    start times are on this process's monotonic clock (system-wide on Linux)."""
    target, _ = gateway
    shape = LoadShape("closed", 2, 0.0, duration_s=60, stream=False)
    before = time.monotonic()
    samples = run_load(target, KEYS, [], _items(*["q"] * 6), shape, processes=2)
    after = time.monotonic()
    assert len(samples) == 6
    assert all(before <= s.started_s <= s.started_s + s.latency_s <= after for s in samples)


def test_only_loopback_targets_unless_allowed() -> None:
    for target in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.9.9.9:5"):
        check_target(target, allow_remote=False)
    for target in ("10.0.0.1:50051", "example.com:443", "[2001:db8::1]:5"):
        with pytest.raises(NotLoopback):
            check_target(target, allow_remote=False)
        check_target(target, allow_remote=True)


def test_an_open_loop_that_falls_behind_says_so(
    gateway: tuple[str, FakeGateway],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It stopped sending without a word: the report looked like a whole run at the rate."""
    from cachemesh.loadtest import runner

    target, _ = gateway
    monkeypatch.setattr(runner, "MAX_OPEN_IN_FLIGHT", 3)
    shape = LoadShape("open", 1, rate_rps=200.0, duration_s=2.0, stream=False, seed=1)
    samples = asyncio.run(run_plan(target, KEYS, _items(*["slow"] * 5_000), shape, seed=1))
    assert len(samples) < 400
    assert "requests in flight" in caplog.text and "are not sent" in caplog.text
    said = int(caplog.text.split("about ")[1].split(" more")[0])
    assert 0 < said <= 200 * 2.0  # what was due before the deadline, not the whole plan


def test_a_run_cut_by_its_duration_says_so_on_its_progress_line(
    gateway: tuple[str, FakeGateway], capsys: pytest.CaptureFixture[str]
) -> None:
    """The bar of a run --duration cut ended at some count of the plan and said nothing."""
    target, _ = gateway
    shape = LoadShape("closed", 2, 0.0, duration_s=0.5, stream=False)
    samples = run_load(target, KEYS, [], _items(*["slow"] * 100), shape)
    answered = sum(s.code != CUT for s in samples)
    (line,) = capsys.readouterr().err.splitlines()  # not a terminal: one plain line
    assert line.startswith(f"load: {answered}/100 ")
    assert line.endswith(" -- --duration 0.5 s reached: the rest was not sent")
