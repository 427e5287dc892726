"""The echo references' shapes (pure), tiny echo chains run end to end, and where the bench
measures a case's echo: around its runs at each level."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.tokens import load_cl100k
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from services.router.calls import warm_commit
from services.semantic_cache.embedder import DIM
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
    for method in ("Lookup", "Plan", "Store"):
        assert size < carrying[method] < size + 600, method  # the request and a few fields
    # Generate carries the Plan's prompt facts beside the request (2 bytes a token)
    assert size + size // 2 < carrying["Generate"] < size + size // 2 + 600
    # the WARM commit names its Plan and FINAL carries no request
    assert carrying["CommitWarm"] < 200 and carrying["CommitFinal"] < 200
    replies = {c.method: c.reply_bytes for c in chain.calls()}
    assert size // 2 < replies.pop("Plan") < size // 2 + 600  # the prompt's facts
    # ``auto``: the miss's Lookup returns the question's embedding for the tier choice
    assert 4 * DIM < replies.pop("Lookup") < 4 * DIM + 200
    assert all(b < 200 for b in replies.values()), replies


def test_a_lookup_for_a_named_model_returns_no_embedding() -> None:
    request = _request("hello")
    request.model = "sim-small"
    lookup = miss_chain("named", [request]).steps[0][0]
    assert lookup.method == "Lookup" and lookup.reply_bytes < 200


async def test_the_plan_and_warm_are_sized_as_prefix_cache_and_the_router_make_them() -> None:
    """Against the real pieces: the Plan a prefix-cache core answers for an agent-sized
    request (its KV block hashes) and the WARM commit the router sends (by plan_id, without
    the request). The echo chain once sent the 17 kB request with every WARM and took the
    Plan's reply for 60 bytes: for the bench's median agent turn (17,053 bytes, 253 KV
    blocks) the router's WARM is 119 bytes and the Plan's reply 8,256."""
    text = " ".join(f"Policy {i}: refunds within thirty days need a receipt." for i in range(300))
    request = _request(text)
    clock = ManualClock()
    core = PrefixCacheCore(
        table=load_model_table(), tokenizer=TokenizerSlot(load_cl100k()),
        cache=InMemoryWarmStore(100), views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(86_400_000, 100), TotalsLedger()), clock=clock,
        lookback=20, plans=PlanMemo(clock, ttl_ms=600_000, max_blocks=100_000),
    )  # fmt: skip
    plan = await PrefixCacheApi(core).plan(
        pc.PlanRequest(tenant="tenant-a", model="sim-large", request=request,
                       replicas=["127.0.0.1:50054", "127.0.0.1:50055"])
    )  # fmt: skip
    assert plan.plan_id and plan.prompt.kv_block_hashes  # held, and the facts sent
    chain = miss_chain("agent", [request])
    echo = {c.method: c for c in chain.calls()}
    assert abs(echo["Plan"].reply_bytes - plan.ByteSize()) < plan.ByteSize() * 0.15
    warm = warm_commit(
        "tenant-a", "0" * 32 + "#" + "0" * 16, "sim-large", "127.0.0.1:50054",
        plan.prompt_tokens, plan.prompt_tokens, plan.plan_id, kv_cached_unreported=False,
    )  # fmt: skip
    assert abs(echo["CommitWarm"].request_bytes - warm.ByteSize()) <= 8
    generate = model_pb2.GenerateRequest(
        tenant="tenant-a", model="sim-large", request=request, prompt=plan.prompt
    )
    assert abs(echo["Generate"].request_bytes - generate.ByteSize()) < generate.ByteSize() * 0.1


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
