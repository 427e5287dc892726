"""A real engine through the whole stack: two llama.cpp ``llama-server`` replicas (built by
``make engine``, SmolLM2-135M-Instruct, one thread each) behind the model processes'
OpenAI-compatible adapter, with the router, both caches and the OTLP receiver as in the other
integration tests.

- real answers, whole and streamed;
- the engine's own ``usage.prompt_tokens_details.cached_tokens`` reconciles the bill: a
  second turn reads its prefix from the replica's KV cache and is billed at the cache-read
  price, up to prefix-cache's estimate from its view of the tenant's prompts on the chosen
  replica, scaled to the engine's count of the prompt (which is most of the read); only the
  second turn is served by the prefix cache (the first reuses only the chat template's opening
  tokens);
- KV-aware routing keeps a conversation on the replica that holds its prefix (the other
  replica, asked the same second turn directly, has none of it cached);
- the engine's KV cache is shared by every tenant: a prefix another tenant left there is
  reused by the engine, but neither billed to nor told in the usage of a tenant whose own
  traffic never sent it (its second request, its own reuse, is billed as a read, in the
  engine's tokens);
- tools to the llama-server rows are refused before anything is sent: SmolLM2's chat template
  has none (the engine's /props says so), and the engine dropped them without a word;
- the engine's error body for a prompt over its context comes back as RESOURCE_EXHAUSTED
  (as the simulator's) carrying llama-server's message;
- a prefill whose client went away stops within a batch, not at the end of the prompt;
- long answers streamed by both replicas with more requests queued behind them are never cut
  for silence mid-answer (a live engine's pace is far within ``ROUTER_MID_ANSWER_STALL_S``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import CachemeshError, Client, RequestTooLargeError
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import load_model_table
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import (
    UPSTREAM_ID,
    EngineOptions,
    LlamaServers,
    Replica,
    local_engine_settings,
)
from services.tools.stack.environment import tool_settings
from services.tools.stack.lifecycle import Stack
from services.tools.stack.otlp_sink import OtlpSink
from services.tools.stack.ports import free_port
from tests.integration import harness

pytestmark = pytest.mark.integration

MODEL = "local-small"
CONTEXT_TOKENS = 2048  # each replica's context: the overflow test's prompt exceeds it


@dataclass
class LlamaStack:
    client: Client
    stack: Stack
    sink: OtlpSink
    replicas: list[Replica]
    by_model_address: dict[str, Replica]  # model process address -> the replica behind it
    logs: dict[int, Path]  # replica index -> its llama-server log
    keys: dict[str, str]  # the demo keys (CACHEMESH_KEY_A, CACHEMESH_KEY_B)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaStack]:
    paths = engine_paths(tool_settings(harness.ROOT, os.environ))  # as make engine
    assert paths.ready(), f"no llama-server build under {paths.root}: run `make engine` first"
    run_dir = tmp_path_factory.mktemp("llama-run")
    options = EngineOptions(2, 1, CONTEXT_TOKENS)
    engines = LlamaServers(paths, run_dir, options)
    sink = OtlpSink()
    sink.start()
    try:
        replicas = engines.start([free_port(), free_port()])
        plain = Stack.on_free_ports(harness.ROOT, run_dir, harness.test_settings(sink))
        stack = plain.with_overrides(local_engine_settings(plain.settings(), replicas, options))
        stack.start(timeout_s=240)
        try:
            keys = read_env_file(run_dir / "demo-keys.env")
            addresses = stack.addresses
            with Client(stack.router_address, api_key=keys["CACHEMESH_KEY_A"]) as client:
                yield LlamaStack(
                    client,
                    stack,
                    sink,
                    replicas,
                    {addresses["model"]: replicas[0], addresses["model-2"]: replicas[1]},
                    {r.index: engines.log_path(r.index) for r in replicas},
                    keys,
                )
        finally:
            stack.stop()
    finally:
        engines.stop()
        sink.stop()


def _request(
    system: str, turns: list[pb.Message], max_tokens: int = 24, namespace: str = ""
) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        max_tokens=max_tokens,
        temperature=0.0,
        system=[pb.ContentBlock(text=system)] if system else [],
        messages=turns,
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS, namespace=namespace),
    )


def _user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])


def _assistant(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text=text)])


def _text(response: pb.CompleteResponse) -> str:
    return "".join(block.text for block in response.content)


def _hand_bill(usage: pb.Usage) -> int:
    spec = load_model_table().models[MODEL]
    return (
        usage.input_tokens * spec.input_nanos
        + usage.cache_read_input_tokens * spec.cache_read_nanos
        + usage.output_tokens * spec.output_nanos
    )


def test_real_answers_whole_and_streamed(llama: LlamaStack) -> None:
    question = _user("What is the capital of France? Answer in one short sentence.")
    whole = llama.client.complete(_request("", [question]))
    assert whole.served_by == pb.LAYER_MODEL and whole.model == MODEL
    assert _text(whole).strip() and not _text(whole).startswith("[simulated")
    assert whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    assert not whole.cost.estimated and whole.cost.cost_nanos == _hand_bill(whole.usage)

    chunks = list(llama.client.stream(_request("", [_user("Name three colours.")])))
    kinds = [chunk.WhichOneof("part") for chunk in chunks]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("delta") >= 2
    streamed = "".join(c.delta.text for c in chunks if c.WhichOneof("part") == "delta")
    assert streamed.strip() and chunks[-1].end.usage.output_tokens > 0


def test_a_conversation_stays_on_its_replica_and_the_engine_cached_tokens_reconcile_the_bill(
    llama: LlamaStack,
) -> None:
    tag = uuid.uuid4().hex
    system = f"Session {tag}. You answer questions about the Northwind Air baggage policy. " + (
        " ".join(
            f"Rule {i}: a checked bag over {20 + i % 9} kg on route {i} costs {30 + i} dollars."
            for i in range(24)
        )
    )
    first_turn = [_user("How much is an overweight bag on route 3?")]
    one = llama.client.complete(_request(system, first_turn))
    # the root span names the replica that answered (a call handed over as stalled on a
    # loaded machine is a chat span of its own, on the replica it left: read first, it failed
    # the check below with the conversation on the other replica)
    root_one, _ = harness.router_spans(llama.sink, one.trace_id)
    replica = root_one.attributes["cachemesh.replica"]
    assert replica in llama.by_model_address
    # a prompt this engine never saw: at most the chat template's opening tokens are reused,
    # which is no prefix-cache hit (less than one KV block)
    assert one.usage.cache_read_input_tokens < 16, one.usage
    assert one.served_by == pb.LAYER_MODEL

    second_turn = [*first_turn, _assistant(_text(one)), _user("And on route 7?")]
    two = llama.client.complete(_request(system, second_turn))
    root_two, _ = harness.router_spans(llama.sink, two.trace_id)
    assert root_two.attributes["cachemesh.replica"] == replica  # back to the warm replica
    # chosen for its warm prefix (the TTFT policy: warm and soonest, or the warm one of a tie)
    assert root_two.attributes["cachemesh.route_reason"] in ("ttft_warm", "affinity_tie")

    # the engine's own report, up to the view's estimate of what this tenant left there: most
    # of the second prompt came from the replica's KV cache
    cached = two.usage.cache_read_input_tokens
    prompt = two.usage.input_tokens + cached
    assert cached > 0.5 * prompt, (cached, prompt)
    assert two.served_by == pb.LAYER_PREFIX_CACHE
    assert not two.cost.estimated and two.cost.cost_nanos == _hand_bill(two.usage)
    # the engine's report reconciled prefix-cache's estimate (cl100k blocks): the drift is kept
    assert root_two.attributes["cachemesh.usage_reported"] is True
    drift = {k: v for k, v in root_two.attributes.items() if k.startswith("cachemesh.drift.")}
    read_drift = drift["cachemesh.drift.cache_read_input_tokens"]
    estimated_read = cached - read_drift
    # the estimate predicted the read from the replica's view (cl100k tokens, full blocks),
    # which, scaled to the engine's count of the prompt, bounds the billed read (the engine's
    # cache is shared by every tenant): most of the engine's read, and no drift beyond it
    assert estimated_read > 0.5 * cached and abs(read_drift) < 0.5 * cached, drift
    print(
        f"\nllama-server cached_tokens: turn 2 read {cached} of {prompt} prompt tokens "
        f"(estimated {estimated_read}); {drift}"
    )

    # the other replica holds none of this conversation: asked directly, it reports no reuse
    other = next(r for a, r in llama.by_model_address.items() if a != replica)
    direct = openai.OpenAI(base_url=other.base_url, api_key="none").chat.completions.create(
        model=UPSTREAM_ID,
        max_tokens=1,
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "How much is an overweight bag on route 3?"},
            {"role": "assistant", "content": _text(one)},
            {"role": "user", "content": "And on route 7?"},
        ],
    )
    assert direct.usage is not None
    details = direct.usage.prompt_tokens_details
    other_cached = (details.cached_tokens or 0) if details is not None else 0
    if root_one.attributes["cachemesh.route_reason"] == "fallback":
        # the first turn stalled there against the row's prior (a loaded machine's engine is
        # slower than local-small=150) and was handed over: that engine prefilled it all the
        # same (one batch), so it holds the first turn too, as the router's README says
        print(f"\nfirst turn handed over: the other replica holds {other_cached} of it too")
    else:
        assert other_cached < 0.1 * cached, (other_cached, cached)


def test_a_prefix_another_tenant_left_on_the_engine_is_not_billed_nor_told(
    llama: LlamaStack,
) -> None:
    """Tenant B sends a prompt that another client (tenant A's traffic, to the engine one
    and the same) left on both replicas: the engine reuses it, but B's bill and usage
    show no read (they would tell B that someone sent that exact prompt). B's own repeat is
    its own reuse, billed as a read."""
    memo = f"Confidential memo {uuid.uuid4().hex}. " + " ".join(
        f"Clause {i}: Northwind buys Contoso on day {i} at {i * 37} million." for i in range(12)
    )
    question = "Summarise the memo in one word."
    for replica in llama.replicas:  # the other tenant's traffic, on both replicas
        openai.OpenAI(base_url=replica.base_url, api_key="none").chat.completions.create(
            model=UPSTREAM_ID,
            max_tokens=1,
            messages=[{"role": "system", "content": memo}, {"role": "user", "content": question}],
        )
    prefix = llama.stack.metrics_addresses["prefix-cache"]
    unattributed = "cachemesh_prefix_cache_kv_unattributed_tokens_total"
    before = _metric(prefix, unattributed)
    with Client(llama.stack.router_address, api_key=llama.keys["CACHEMESH_KEY_B"]) as b:
        one = b.complete(_request(memo, [_user(question)], max_tokens=4))
        reused = _metric(prefix, unattributed) - before
        two = b.complete(_request(memo, [_user(question)], max_tokens=4))
    prompt = one.usage.input_tokens + one.usage.cache_read_input_tokens
    # the engine reused the other tenant's prefix (counted by model, not billed) ...
    assert reused > 0.5 * prompt, (reused, prompt)
    # ... which B's first request neither pays nor learns of
    assert one.usage.cache_read_input_tokens == 0 and one.usage.kv_cached_tokens == 0, one.usage
    assert one.served_by == pb.LAYER_MODEL and one.cost.cost_nanos == _hand_bill(one.usage)
    # its repeat reads what its own first request left: all of the engine's reuse (its own
    # prompt, whole) but the last partial block, in the engine's tokens (SmolLM2 counts more
    # than cl100k: capped at cl100k's count, it read 240 of 297)
    again = two.usage.input_tokens + two.usage.cache_read_input_tokens
    assert two.usage.cache_read_input_tokens >= (again - 1) // 16 * 16, two.usage
    print(
        f"\nanother tenant's prefix: {reused:.0f} of {prompt} prompt tokens reused unbilled; "
        f"B's own repeat read {two.usage.cache_read_input_tokens} of "
        f"{two.usage.input_tokens + two.usage.cache_read_input_tokens} "
        f"(kv_cached_tokens {two.usage.kv_cached_tokens}), {two.cost.cost_nanos:,} nanos"
    )


def test_tools_are_refused_by_the_rows_of_an_engine_whose_model_has_none(
    llama: LlamaStack,
) -> None:
    """SmolLM2's chat template has no tools: llama-server dropped a request's tools (the same
    prompt tokens with a tool as without) and its model answered as if there were none; the
    rows say ``takes_tools = false`` and the Gateway refuses such a request, naming ``tools``."""
    replica = llama.replicas[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.port}/props", timeout=10) as reply:
        caps = json.load(reply)["chat_template_caps"]
    assert caps["supports_tools"] is False and caps["supports_tool_calls"] is False, caps
    engine = openai.OpenAI(base_url=replica.base_url, api_key="none").chat.completions
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Oslo?"}]
    weather: ChatCompletionToolParam = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    bare = engine.create(model=UPSTREAM_ID, max_tokens=1, messages=question)
    given = engine.create(model=UPSTREAM_ID, max_tokens=1, messages=question, tools=[weather])
    assert bare.usage is not None and given.usage is not None
    assert given.usage.prompt_tokens == bare.usage.prompt_tokens  # the tool never reached it

    request = _request("", [_user("Weather in Oslo?")])
    request.tools.append(pb.Tool(name="get_weather", input_schema_json='{"type": "object"}'))
    for model in (MODEL, "auto"):  # auto's tiers are the llama-server rows here
        request.model = model
        with pytest.raises(CachemeshError) as info:
            llama.client.complete(request)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message.startswith("tools: "), info.value.message
        assert "`takes_tools = false`" in info.value.message


def _metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_a_prompt_over_the_engines_context_is_refused_with_its_message(
    llama: LlamaStack,
) -> None:
    words = " ".join(f"item{i} costs {i % 97} dollars and ships tomorrow." for i in range(500))
    with pytest.raises(RequestTooLargeError) as info:  # not a RateLimitError: no wait helps
        llama.client.complete(_request("", [_user(f"Summarise: {words}")]))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "CONTEXT_WINDOW"
    assert "exceeds the available context size" in info.value.message, info.value.message
    assert "context window" in info.value.message  # the HTTP front's 400, not its 413
    print(f"\ncontext overflow: {info.value.message[:300]}")
    # the engines are still serving after the refusal
    after = llama.client.complete(_request("", [_user("Say hello.")], max_tokens=8))
    assert _text(after).strip()


def _wait_for(log: Path, pattern: str, after: int, timeout_s: float = 180.0) -> re.Match[str]:
    """The first match of ``pattern`` in ``log`` past its first ``after`` characters."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = re.compile(pattern).search(log.read_text(errors="replace"), after)
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"no {pattern!r} in {log} after {timeout_s:.0f}s"
        time.sleep(0.1)


def test_a_prefill_whose_client_went_away_stops_within_a_batch(llama: LlamaStack) -> None:
    """llama-server notices a closed connection only between batches: at its default batch of
    2,048 tokens a cut prefill of a long prompt ran to the prompt's end (15.5 s after the
    cancel here) and the replica's next request waited for it."""
    replica, log = llama.replicas[0], llama.logs[llama.replicas[0].index]
    system = f"{uuid.uuid4().hex} " + " ".join(
        f"Item {i}: widget {i * 7} weighs {i % 13} kg." for i in range(120)
    )
    tokenize = urllib.request.Request(
        f"http://127.0.0.1:{replica.port}/tokenize",
        data=json.dumps({"content": system}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(tokenize, timeout=30) as reply:
        prompt_tokens = len(json.load(reply)["tokens"])  # the system text alone
    assert 1_500 < prompt_tokens < CONTEXT_TOKENS - 64

    seen = len(log.read_text(errors="replace"))
    body = {
        "model": UPSTREAM_ID,
        "max_tokens": 4,
        "stream": True,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
    }
    connection = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=30)
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
    )
    launched = _wait_for(log, r"task (\d+) \| processing task", seen)
    connection.close()  # the client goes away during the prefill
    task = launched.group(1)
    _wait_for(log, rf"cancel task, id_task = {task}\b", launched.end())
    stopped = _wait_for(log, rf"task {task} \| stop processing: n_tokens = (\d+)", launched.end())
    processed = int(stopped.group(1))
    assert processed < prompt_tokens, (processed, prompt_tokens)
    print(f"\ncut prefill: stopped after {processed} of its {prompt_tokens}+ prompt tokens")
    # the replica serves on
    after = llama.client.complete(_request("", [_user("Say hello.")], max_tokens=8))
    assert _text(after).strip()


def test_long_answers_with_requests_queued_behind_them_are_not_cut_for_silence(
    llama: LlamaStack,
) -> None:
    """Six essays on two one-slot replicas (one thread each): two decode while four wait for
    a slot, the machine busy with all of it. Each streams to its end: none is taken for a hung
    replica (the router's silence watch looks at each waiting read about once a second)."""
    router = llama.stack.metrics_addresses["router"]
    cut = "gen_ai_client_operation_duration_seconds_count"

    def cuts() -> float:
        with urllib.request.urlopen(f"http://{router}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == cut and sample.labels.get("error_type") == "replica_cut"
        )

    def essay(n: int) -> list[pb.CompleteChunk]:
        question = _user(f"{uuid.uuid4().hex} Write a long, detailed essay about bread, part {n}.")
        return list(llama.client.stream(_request("", [question], max_tokens=300)))

    before = cuts()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(essay, range(6)))
    ends = [chunks[-1].end for chunks in answers]
    assert all(chunks[-1].WhichOneof("part") == "end" for chunks in answers)
    assert max(end.usage.output_tokens for end in ends) > 100, [e.usage for e in ends]
    assert cuts() == before
    print(f"\nlong answers, none cut: {sorted(end.usage.output_tokens for end in ends)} tokens")


def test_a_prefill_is_continued_not_repeated(llama: LlamaStack) -> None:
    """llama-server continues a prefill but repeats it at the start of its answer ("The
    capital of France is Paris.", its completion_tokens 3, the continuation's); the rows say
    ``echoes_prefill`` and the replica strips the echo, whole and streamed: a caller joining
    prefill and answer gets the prefill once. The bill is the engine's count, as before."""
    prefill = "The capital of France is"
    turns = [_user("What is the capital of France?"), _assistant(prefill)]
    whole = llama.client.complete(_request("", turns, max_tokens=8))
    chunks = list(llama.client.stream(_request("", turns, max_tokens=8)))
    streamed = "".join(c.delta.text for c in chunks if c.WhichOneof("part") == "delta")
    for answer in (_text(whole), streamed):
        assert not answer.startswith(prefill), answer  # was "The capital of France is Paris."
        assert "Paris" in answer and (prefill + answer).count(prefill) == 1, answer
    assert 0 < whole.usage.output_tokens <= 8 and whole.cost.cost_nanos == _hand_bill(whole.usage)
