"""The echo references' shapes (pure), tiny echo chains run end to end, and where the bench
measures a case's echo: around its runs at each level."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.tools.bench.gateway import runs
from services.tools.bench.gateway.chain import median_request, miss_chain, two_hop
from services.tools.bench.gateway.echo import EchoRun, RunningChain, chain_reference, echo_row
from services.tools.bench.gateway.stacks import Target


def _request(text: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="auto",
        max_tokens=100,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )


def test_a_miss_is_the_routers_six_calls_in_its_order() -> None:
    chain = miss_chain("agent", [_request("a" * 500), _request("b" * 9000), _request("c" * 20)])
    assert [[c.method for c in step] for step in chain.steps] == [
        ["Lookup"], ["Plan"], ["Generate"], ["CommitFinal", "Store"],
    ]  # fmt: skip
    generate = chain.steps[2][0]
    assert [c.method for c in generate.during] == ["CommitWarm"]  # at the first token
    assert generate.replies > 2  # start, deltas, end
    assert [c.method for c in chain.calls()] == [
        "Lookup", "Plan", "Generate", "CommitWarm", "CommitFinal", "Store",
    ]  # fmt: skip
    assert chain.services() == ["semantic-cache", "prefix-cache", "model"]
    assert chain.describe()["downstream_calls"] == 6


def test_the_sizes_are_those_of_the_real_messages_for_the_median_request() -> None:
    requests = [_request("a" * 500), _request("b" * 9000), _request("c" * 20)]
    assert median_request(requests) is requests[0]
    chain = miss_chain("agent", requests)
    size = requests[0].ByteSize()
    assert chain.request_bytes == size
    carrying = {c.method: c.request_bytes for c in chain.calls()}
    for method in ("Lookup", "Plan", "Generate", "CommitWarm", "Store"):
        assert size < carrying[method] < size + 600, method  # the request and a few fields
    assert carrying["CommitFinal"] < 200  # FINAL carries no request
    assert all(c.reply_bytes < 200 for c in chain.calls())


def test_two_hops_is_one_call_of_the_same_payload_each_way() -> None:
    chain = two_hop(600)
    assert (chain.request_bytes, chain.reply_bytes) == (600, 600)
    assert [(c.service, c.request_bytes, c.reply_bytes) for c in chain.calls()] == [
        ("hop-2", 600, 600)
    ]


def test_an_echo_chain_answers_every_call_at_every_level() -> None:
    chain = miss_chain("tiny", [_request("hello")])
    out = chain_reference(chain, (1, 3), requests=7)
    assert out["chain"]["name"] == "tiny" and out["requests_per_level"] == 7
    assert out["measured"] == "after the cases"
    assert [row["concurrency"] for row in out["levels"]] == [1, 3]
    assert all(row["latency_ms"]["n"] == 7 and row["throughput_rps"] > 0 for row in out["levels"])


def test_runs_of_one_level_pool_their_calls_and_walls() -> None:
    row = echo_row([EchoRun(8, [0.001] * 30, 0.01), EchoRun(8, [0.003] * 10, 0.03)])
    assert (row["concurrency"], row["runs"], row["latency_ms"]["n"]) == (8, 2, 40)
    assert row["throughput_rps"] == 1000.0  # 40 calls over 0.04 s of walls
    with pytest.raises(ValueError, match="same level"):
        echo_row([EchoRun(1, [0.001], 0.001), EchoRun(8, [0.001], 0.001)])


def test_a_running_chain_answers_runs_between_other_work() -> None:
    chain = miss_chain("tiny", [_request("hello")])
    with RunningChain(chain) as running:
        first = running.run(2, 3)
        second = running.run(2, 4)
    assert [len(first.latencies), len(second.latencies)] == [3, 4]
    assert echo_row([first, second])["latency_ms"]["n"] == 7


def test_the_echo_of_a_case_brackets_its_runs_at_each_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []

    class Echo:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, level: int, requests: int) -> EchoRun:
            order.append(f"echo {self.name} {requests}")
            return EchoRun(level, [0.001] * requests, 0.001 * requests)

    def case(name: str) -> Callable[..., object]:
        def one(plan: object, target: Target, level: int, repeat: int) -> object:
            order.append(f"{name} {target.name}")
            return None

        return one

    monkeypatch.setattr(runs, "_exact", case("a"))
    monkeypatch.setattr(runs, "_agent", case("c"))
    monkeypatch.setattr(runs, "combine", lambda target, level, done: {"runs": len(done)})
    plan = runs.Plan(Path("."), Path("."), "r", (8,), 10, 10, [])
    off, on = Target("x", {}, None, "off"), Target("y", {}, None, "on")
    echoes = {runs.EXACT: Echo("two-hop"), runs.AGENT: Echo("agent")}
    by_case, echo_rows = runs._interleaved(plan, off, on, 8, echoes)  # type: ignore[arg-type]
    assert order == [
        "echo two-hop 15", "a off", "a on", "a on", "a off", "echo two-hop 15",
        "echo agent 5", "c off", "c on", "c on", "c off", "echo agent 5",
    ]  # fmt: skip
    assert echo_rows[runs.EXACT]["latency_ms"]["n"] == 30  # HIT_FACTOR x 10 requests
    assert by_case[runs.AGENT] == {"off": {"runs": 2}, "on": {"runs": 2}}
