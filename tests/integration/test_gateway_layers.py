"""The Done-when scenarios on real processes: which layer serves what, and what it costs."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachemesh import Client, answer_text, build_request
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import RunningStack
from tests.integration.prompts import agent_request

pytestmark = pytest.mark.integration


def _ns() -> str:
    return uuid.uuid4().hex[:12]


def test_same_question_twice_is_an_exact_semantic_hit(client_a: Client) -> None:
    ns = _ns()
    first = client_a.complete(build_request("How do I reset my password?", namespace=ns))
    second = client_a.complete(build_request("How do I reset my password?", namespace=ns))
    assert first.served_by == pb.LAYER_MODEL
    assert second.served_by == pb.LAYER_SEMANTIC_CACHE
    assert second.semantic.exact and second.semantic.similarity == 1.0
    assert second.semantic.entry_id
    assert answer_text(second) == answer_text(first)
    assert second.cost.cost_nanos == 0
    assert second.cost.saved_nanos == second.cost.baseline_nanos > 0
    assert second.usage.output_tokens == first.usage.output_tokens
    # the hit counts the same prompt the miss was billed for (no Plan call behind it)
    prompt = (
        first.usage.input_tokens
        + first.usage.cache_creation_input_tokens
        + first.usage.cache_read_input_tokens
    )
    assert second.usage.input_tokens == prompt > 0
    assert not second.cost.estimated


def test_paraphrase_is_served_with_its_similarity(client_a: Client) -> None:
    ns = _ns()
    client_a.complete(build_request("I forgot my password, how can I change it?", namespace=ns))
    hit = client_a.complete(build_request("How do I reset my password?", namespace=ns))
    assert hit.served_by == pb.LAYER_SEMANTIC_CACHE
    assert not hit.semantic.exact
    assert 0.88 <= hit.semantic.similarity < 1.0


def test_unrelated_question_is_not_served_from_the_cache(client_a: Client) -> None:
    ns = _ns()
    client_a.complete(build_request("How do I reset my password?", namespace=ns))
    other = client_a.complete(build_request("What is the capital of Australia?", namespace=ns))
    assert other.served_by == pb.LAYER_MODEL


def test_another_tenant_never_gets_the_answer(client_a: Client, client_b: Client) -> None:
    ns = _ns()
    client_a.complete(build_request("How do I cancel my subscription?", namespace=ns))
    theirs = client_b.complete(build_request("How do I cancel my subscription?", namespace=ns))
    assert theirs.served_by != pb.LAYER_SEMANTIC_CACHE


def test_another_system_prompt_is_another_scope(client_a: Client) -> None:
    ns = _ns()
    question = "How do I contact customer support?"
    client_a.complete(build_request(question, namespace=ns, system="You are a bank's assistant."))
    other = client_a.complete(
        build_request(question, namespace=ns, system="You are an airline's assistant.")
    )
    assert other.served_by != pb.LAYER_SEMANTIC_CACHE


def test_second_turn_reads_the_prefix_cache(client_a: Client) -> None:
    marker = _ns()
    first = client_a.complete(agent_request(marker, ["Please look up reservation ZFA04Y."]))
    assert first.served_by == pb.LAYER_MODEL
    assert first.usage.cache_creation_input_tokens > 1024
    assert first.cost.saved_nanos < 0  # the write turn pays the 1.25x premium
    second = client_a.complete(
        agent_request(
            marker,
            ["Please look up reservation ZFA04Y.", "Now move it to May 17."],
            answers=[answer_text(first)],
        )
    )
    assert second.served_by == pb.LAYER_PREFIX_CACHE
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    # Anthropic's prices per token in nanos, by hand (models.toml cites them): input, 5-minute
    # write, read, output; the baseline is every prompt token at the input price
    price = {"sim-small": (1000, 1250, 100, 5000), "sim-large": (3000, 3750, 300, 15000)}
    for turn in (first, second):
        inp, write, read, out = price[turn.model]
        u = turn.usage
        assert turn.cost.cost_nanos == (
            u.input_tokens * inp
            + u.cache_creation_input_tokens * write
            + u.cache_read_input_tokens * read
            + u.output_tokens * out
        )
        prompt = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
        assert turn.cost.baseline_nanos == prompt * inp + u.output_tokens * out
    assert second.cost.saved_nanos == second.cost.baseline_nanos - second.cost.cost_nanos > 0
    assert not second.cost.estimated
    assert second.usage.kv_cached_tokens > 0  # the engine reused the prefix too


def test_prefix_cache_is_per_tenant(client_a: Client, client_b: Client) -> None:
    marker = _ns()
    client_a.complete(agent_request(marker, ["Please look up reservation ZFA04Y."]))
    theirs = client_b.complete(agent_request(marker, ["Please look up reservation QWE123."]))
    assert theirs.usage.cache_read_input_tokens == 0
    assert theirs.served_by == pb.LAYER_MODEL


def test_retry_with_the_same_request_id_is_answered_and_billed_once(
    client_a: Client, stack: RunningStack
) -> None:
    request = build_request(
        f"Write a limerick about caches #{_ns()}", namespace=_ns(), request_id=uuid.uuid4().hex
    )
    before = stack.totals("tenant-a")
    first = client_a.complete(request)
    retry = client_a.complete(request)
    after = stack.totals("tenant-a")
    assert retry.replayed and not first.replayed  # the first answer, marked: billed once
    retry.replayed = False
    assert retry == first  # same answer, same trace, same bill
    assert after.requests - before.requests == 1
    assert after.cost_nanos - before.cost_nanos == first.cost.cost_nanos


def test_streaming_sends_start_deltas_end(client_a: Client) -> None:
    request = build_request(f"Tell me about baggage rules {_ns()}", namespace=_ns())
    chunks = list(client_a.stream(request))
    kinds = [c.WhichOneof("part") for c in chunks]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"delta"}
    start, end = chunks[0].start, chunks[-1].end
    assert start.served_by == pb.LAYER_MODEL and start.trace_id and start.model
    streamed = "".join(c.delta.text for c in chunks[1:-1])
    assert streamed == answer_text(end)
    assert end.usage.output_tokens > 0 and end.stop_reason in ("end_turn", "max_tokens")


def test_max_tokens_cuts_the_answer(client_a: Client) -> None:
    response = client_a.complete(build_request(f"Hello {_ns()}", max_tokens=5, namespace=_ns()))
    assert response.stop_reason == "max_tokens" and response.usage.output_tokens == 5


def test_max_tokens_answers_are_not_served_to_requests_that_allow_more(client_a: Client) -> None:
    ns = _ns()
    client_a.complete(build_request("What time is check-in?", max_tokens=5, namespace=ns))
    again = client_a.complete(build_request("What time is check-in?", max_tokens=500, namespace=ns))
    assert again.served_by == pb.LAYER_MODEL


def test_concurrent_cold_requests_both_write_and_neither_reads(client_a: Client) -> None:
    marker = _ns()
    requests = [
        agent_request(marker, ["Please look up reservation ZFA04Y."]),
        agent_request(marker, ["Please look up reservation QWE123."]),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        responses = list(pool.map(client_a.complete, requests))
    for response in responses:  # both arrived before either prefix was warm
        assert response.usage.cache_read_input_tokens == 0
        assert response.usage.cache_creation_input_tokens > 1024
        assert response.served_by == pb.LAYER_MODEL
