"""The echo references' shapes (pure) and one tiny echo chain run end to end."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from services.tools.bench.gateway.chain import median_request, miss_chain, two_hop
from services.tools.bench.gateway.echo import chain_reference


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
    assert [row["concurrency"] for row in out["levels"]] == [1, 3]
    assert all(row["latency_ms"]["n"] == 7 and row["throughput_rps"] > 0 for row in out["levels"])
